"""The training step as one pure function: rectified-flow loss through the RAB prefill and the CGB forward.

Trainable tree: {"rab": RAB LoRA, "cgb": CGB LoRA + beta}; the frozen base params are a separate argument
that is never differentiated. Every random draw comes from `step_key(seed, step)`, so a resumed run draws
the same numbers as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from customshift_jax.api import Params, as_dtype
from customshift_jax.config import MMDiTConfig
from customshift_jax.customshift import init_lora, make_customshift_forward, make_prefill
from customshift_jax.lora import LoRAConfig

BATCH_KEYS = ("latents", "ref_latents", "prompt_embeds", "pooled", "subject_embeds", "subject_pooled")


@flax.struct.dataclass
class TrainState:
    """Micro-step counter, the trainable tree {"rab", "cgb"} (fp32 master weights) and the optimizer state."""

    step: jax.Array
    trainable: Params
    opt_state: Any


def init_train_state(config: MMDiTConfig, lora: LoRAConfig, optimizer: optax.GradientTransformation,
                     seed: int) -> TrainState:
    """Fresh LoRAs for both branches (B = 0, beta = 0) and the optimizer state, from `seed`."""
    k_rab, k_cgb = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0x10CA), 2)
    trainable = {"rab": init_lora(config, lora, k_rab, branch="rab"),
                 "cgb": init_lora(config, lora, k_cgb, branch="cgb")}
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


def make_loss_fn(config: MMDiTConfig, lora: LoRAConfig, *, dtype: Any = jnp.float32, remat: str = "none",
                 shift: str = "cads", form: str = "two_pass", text_dropout: float = 0.1, ref_dropout: float = 0.05,
                 backend: str = "xla", activation_sharding: Callable | None = None) -> Callable:
    """Pure `loss(trainable, base_params, batch, key) -> (loss, aux)`.

    Text dropout (per sample, probability `text_dropout`): "drop" means the prompt embeddings and the pooled
    embedding of that sample are set to zeros (SD3 pipelines feed empty-prompt embeddings instead; zeros are
    the unconditional input here). Reference dropout (per sample, probability `ref_dropout`): that sample runs
    with gamma = 0, i.e. lambda = -inf, which removes its reference path exactly (the RAB prefill still runs;
    a dropped sample gives it no gradient).
    """
    if shift == "concat" and ref_dropout > 0:
        raise ValueError("reference dropout works through gamma = 0, which shift='concat' ignores; set "
                         "ref_dropout to 0 or train with shift='cads'.")
    dtype = as_dtype(dtype)
    prefill = make_prefill(config, lora, dtype=dtype, backend=backend, activation_sharding=activation_sharding)
    forward = make_customshift_forward(config, lora, shift=shift, form=form, dtype=dtype, backend=backend,
                                       remat=remat, activation_sharding=activation_sharding)
    skip = np.zeros((config.num_layers,), bool)

    def loss_fn(trainable, base_params, batch, key):
        x0 = batch["latents"].astype(jnp.float32)
        b = x0.shape[0]
        k_t, k_eps, k_text, k_ref = jax.random.split(key, 4)
        t = sample_timesteps(k_t, b)
        eps = jax.random.normal(k_eps, (x0.size,), jnp.float32).reshape(x0.shape)
        tb = t[:, None, None, None]
        x_t = (1.0 - tb) * x0 + tb * eps
        keep_text = jax.random.uniform(k_text, (b,)) >= text_dropout
        ehs = jnp.where(keep_text[:, None, None], batch["prompt_embeds"], 0).astype(jnp.float32)
        pooled = jnp.where(keep_text[:, None], batch["pooled"], 0).astype(jnp.float32)
        drop_ref = jax.random.uniform(k_ref, (b,)) < ref_dropout
        gamma = jnp.where(drop_ref, 0.0, 1.0).astype(jnp.float32)  # (B,)
        ref_kv = prefill(base_params, trainable["rab"], batch["ref_latents"].astype(jnp.float32),
                         batch["subject_embeds"].astype(jnp.float32), batch["subject_pooled"].astype(jnp.float32))
        pred = forward(base_params, trainable["cgb"], x_t, 1000.0 * t, ehs, pooled, skip, ref_kv, gamma)
        loss = rectified_flow_loss(pred, x0, eps)
        return loss, {"ref_dropped": jnp.mean(drop_ref.astype(jnp.float32)),
                      "text_dropped": 1.0 - jnp.mean(keep_text.astype(jnp.float32)), "t_mean": jnp.mean(t)}

    return loss_fn


def make_train_step(config: MMDiTConfig, lora: LoRAConfig, optimizer: optax.GradientTransformation, *,
                    seed: int, schedule: optax.Schedule | None = None, accum_steps: int = 1,
                    **loss_kw) -> Callable:
    """Pure `step(state, base_params, batch) -> (state, metrics)`; jit it (with shardings if wanted).

    `loss_kw`: dtype (compute dtype; master weights and optimizer state stay fp32), remat ("none", "dots",
    "full"), shift, form, text_dropout, ref_dropout, backend, activation_sharding (see `make_loss_fn`).
    """
    loss_fn = make_loss_fn(config, lora, **loss_kw)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, base_params: Params, batch: dict) -> tuple[TrainState, dict]:
        base_params = jax.lax.stop_gradient(base_params)
        (loss, aux), grads = grad_fn(state.trainable, base_params, batch, step_key(seed, state.step))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step // accum_steps), jnp.float32)
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return step
