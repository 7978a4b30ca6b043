"""The training step as one pure function: rectified-flow loss through the RAB prefill and the CGB forward.

Trainable tree: {"rab": RAB LoRA, "cgb": CGB LoRA + beta}; the frozen base params are a separate argument
that is never differentiated. Every random draw comes from `step_key(seed, step)`, so a resumed run draws
the same numbers as an uninterrupted one. The noising (`flow_matching_inputs`) and the optimizer step
(`make_step_fn`, with an optional EMA) are shared with the full-parameter base training of `train.base_step`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from customshift_jax.customshift.branches import init_lora, make_customshift_forward, make_prefill
from customshift_jax.customshift.cads import GAMMA_FREE
from customshift_jax.models.mmdit.api import Params
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.parallel.sharding import BATCH_AXES, REPLICATED, EntryAxes

BATCH_KEYS = ("latents", "ref_latents", "prompt_embeds", "pooled", "subject_embeds", "subject_pooled")
# Both training modes' step(state, base_params, batch) -> (state, metrics) on a mesh:
# `ShardedFunction(step, mesh, rules, *TRAIN_STEP_AXES)`. The trainable tree, its optimizer state and the frozen
# base are laid out by path (a LoRA's A takes its base kernel's input dim, B its output dim; Adam's moments follow
# their LoRA), the batch split along "batch", the metrics replicated; the returned state keeps its layout.
TRAIN_STEP_AXES = EntryAxes(("params", "params", BATCH_AXES), ("params", REPLICATED))


@flax.struct.dataclass
class TrainState:
    """Micro-step counter, the trainable tree (fp32 master weights: {"rab", "cgb"}, or the whole MMDiT in
    train.mode=base), the optimizer state and, when an EMA is kept, its copy of the trainable tree (None: no
    EMA, so a LoRA state has exactly the leaves it always had)."""

    step: jax.Array
    trainable: Params
    opt_state: Any
    ema: Params | None = None


def init_train_state(config: MMDiTConfig, lora_config: LoRAConfig, optimizer: optax.GradientTransformation,
                     seed: int) -> TrainState:
    """Fresh LoRAs for both branches (B = 0, beta = 0) and the optimizer state, from `seed`."""
    k_rab, k_cgb = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x10CA), 2)
    trainable = {"rab": init_lora(config, lora_config, k_rab, branch="rab"),
                 "cgb": init_lora(config, lora_config, k_cgb, branch="cgb")}
    trainable = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of micro-step `step` of a run seeded with `seed` (the only source of randomness in a step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def sample_timesteps(key: jax.Array, batch: int) -> jax.Array:
    """t ~ logit-normal(0, 1): sigmoid of a standard normal, float32 (B,)."""
    return jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))


def rectified_flow_loss(pred: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
    """Mean squared error to the flow-matching velocity target eps - x0 (float32)."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - (eps - x0).astype(jnp.float32)))


class FlowInputs(NamedTuple):
    """One batch noised for rectified flow, with text dropout applied (what both training modes feed the model)."""

    x0: jax.Array          # (B, C, H, W) clean latents, float32
    eps: jax.Array         # (B, C, H, W) noise
    t: jax.Array           # (B,) flow time in (0, 1); the model timestep is 1000 t
    x_t: jax.Array         # (1 - t) x0 + t eps
    ehs: jax.Array         # (B, M, J) prompt embeddings, zeros where the text is dropped
    pooled: jax.Array      # (B, P) pooled embeddings, zeros where the text is dropped
    keep_text: jax.Array   # (B,) bool
    key_rest: jax.Array    # the step key's 4th split (the reference dropout of the LoRA loss)

    def aux(self) -> dict[str, jax.Array]:
        """The metrics every loss reports about its draws."""
        return {"text_dropped": 1.0 - jnp.mean(self.keep_text.astype(jnp.float32)), "t_mean": jnp.mean(self.t)}


def flow_matching_inputs(batch: dict, key: jax.Array, text_dropout: float) -> FlowInputs:
    """x_t = (1 - t) x0 + t eps with t logit-normal, and per-sample text dropout (zeros: the unconditional
    input), all from one step key so that both training modes draw the same numbers the same way."""
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_eps, k_text, k_rest = jax.random.split(key, 4)
    t = sample_timesteps(k_t, b)
    eps = jax.random.normal(k_eps, (x0.size,), jnp.float32).reshape(x0.shape)
    tb = t[:, None, None, None]
    x_t = (1.0 - tb) * x0 + tb * eps
    keep_text = jax.random.uniform(k_text, (b,)) >= text_dropout
    ehs = jnp.where(keep_text[:, None, None], batch["prompt_embeds"], 0).astype(jnp.float32)
    pooled = jnp.where(keep_text[:, None], batch["pooled"], 0).astype(jnp.float32)
    return FlowInputs(x0, eps, t, x_t, ehs, pooled, keep_text, k_rest)


def make_loss_fn(config: MMDiTConfig, lora_config: LoRAConfig, options: RunOptions | None = None, *,
                 shift: str = "cads", form: str = "two_pass", text_dropout: float = 0.1, ref_dropout: float = 0.05) -> Callable:
    """Pure `loss(trainable, base_params, batch, key) -> (loss, aux)`; `options`: how both branches run
    (compute dtype, attention backend, remat, activation sharding).

    Text dropout (per sample, probability `text_dropout`): "drop" means the prompt embeddings and the pooled
    embedding of that sample are set to zeros (SD3 pipelines feed empty-prompt embeddings instead; zeros are
    the unconditional input here). Reference dropout (per sample, probability `ref_dropout`): that sample runs
    with gamma = 0, i.e. lambda = -inf, which removes its reference path exactly (the RAB prefill still runs;
    a dropped sample gives it no gradient).
    """
    if shift in GAMMA_FREE and ref_dropout > 0:
        raise ValueError(f"reference dropout works through gamma = 0, which shift='{shift}' ignores; set "
                         "ref_dropout to 0 or train with shift='cads'.")
    prefill = make_prefill(config, lora_config, options)
    forward = make_customshift_forward(config, lora_config, options, shift=shift, form=form)
    skip = np.zeros((config.num_layers,), bool)

    def loss_fn(trainable, base_params, batch, key):
        f = flow_matching_inputs(batch, key, text_dropout)
        b = f.x0.shape[0]
        drop_ref = jax.random.uniform(f.key_rest, (b,)) < ref_dropout
        gamma = jnp.where(drop_ref, 0.0, 1.0).astype(jnp.float32)  # (B,)
        ref_kv = prefill(base_params, trainable["rab"], batch["ref_latents"].astype(jnp.float32),
                         batch["subject_embeds"].astype(jnp.float32), batch["subject_pooled"].astype(jnp.float32))
        pred = forward(base_params, trainable["cgb"], f.x_t, 1000.0 * f.t, f.ehs, f.pooled, skip, ref_kv, gamma)
        loss = rectified_flow_loss(pred, f.x0, f.eps)
        return loss, {"ref_dropped": jnp.mean(drop_ref.astype(jnp.float32)), **f.aux()}

    return loss_fn


def make_train_step(config: MMDiTConfig, lora_config: LoRAConfig, optimizer: optax.GradientTransformation,
                    options: RunOptions | None = None, *, seed: int, schedule: optax.Schedule | None = None,
                    accum_steps: int = 1, **loss_kw: Any) -> Callable:
    """Pure `step(state, base_params, batch) -> (state, metrics)`; jit it, or shard it (`TRAIN_STEP_AXES`).

    `options.dtype` is the compute dtype (master weights and optimizer state stay fp32). `loss_kw`: shift,
    form, text_dropout, ref_dropout (see `make_loss_fn`).
    """
    return make_step_fn(make_loss_fn(config, lora_config, options, **loss_kw), optimizer, seed=seed, schedule=schedule,
                        accum_steps=accum_steps)


def update_ema(ema: Params, params: Params, decay: float, applied: jax.Array | None = None) -> Params:
    """ema = decay * ema + (1 - decay) * params, left as it was where the bool `applied` is False (None: always)."""
    def one(e, p):
        new = decay * e + (1.0 - decay) * p.astype(e.dtype)
        return new if applied is None else jnp.where(applied, new, e)

    return jax.tree_util.tree_map(one, ema, params)


def make_step_fn(loss_fn: Callable, optimizer: optax.GradientTransformation, *, seed: int,
                 schedule: optax.Schedule | None = None, accum_steps: int = 1, ema_decay: float = 0.0) -> Callable:
    """Pure `step(state, base_params, batch) -> (state, metrics)` from `loss(trainable, base, batch, key)`.

    The optimizer step both training modes share. A state with an EMA (`state.ema` not None) gets it updated
    with `ema_decay` after every optimizer update (with `accum_steps` > 1 only on the micro-steps that apply
    one, as optax.MultiSteps does).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, base_params: Params, batch: dict) -> tuple[TrainState, dict]:
        base_params = jax.lax.stop_gradient(base_params)
        (loss, aux), grads = grad_fn(state.trainable, base_params, batch, step_key(seed, state.step))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step // accum_steps), jnp.float32)
        ema = state.ema
        if ema is not None:
            applied = None if accum_steps == 1 else (state.step + 1) % accum_steps == 0
            ema = update_ema(ema, trainable, ema_decay, applied)
        return TrainState(state.step + 1, trainable, opt_state, ema), metrics

    return step
