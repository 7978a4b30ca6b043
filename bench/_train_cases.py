"""The training rows of the CPU benchmarks: the CustomShift LoRA step (our `make_train_step` vs the PyTorch
reference `TorchCustomShift` + torch.optim.AdamW) and the subject world's full-parameter base step
(`make_base_train_step` vs diffusers' transformer + AdamW + an EMA), both with the optimizer of
`train.optim.make_optimizer` (global-norm clip 1, AdamW). No text or reference dropout, so that both sides see the
same draws: the JAX step's noise and timesteps (`flow_matching_inputs` on step key 0) are handed to torch.

Each side's first step starts from the same weights: its loss and updated params are the row's relative errors.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from _cases import Case, _compile
from _common import MMDiTPair

LORA_LR = 1e-4  # bench/train.py's
BASE_LR, BASE_EMA = 1e-3, 0.998  # train/configs/world-base.yaml (its warm-up left out: lr 0 at step 0)


def train_batch(config, *, batch: int, size: int, text_len: int, subject_len: int, seed: int = 0) -> dict:
    """A training batch (`train.step.BATCH_KEYS`) of standard normals, jax float32; the reference latents as
    large as the target's."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    c, j, p = config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
    return {"latents": f(batch, c, size, size), "ref_latents": f(batch, c, size, size),
            "prompt_embeds": f(batch, text_len, j), "pooled": f(batch, p),
            "subject_embeds": f(batch, subject_len, j), "subject_pooled": f(batch, p)}


def _flow_draws(batch: dict):
    """The JAX step's first draws as torch tensors: x_t, 1000 t, prompt, pooled, target eps - x0."""
    import jax.numpy as jnp
    import torch

    from customshift_jax.train.step import flow_matching_inputs, step_key

    f = flow_matching_inputs(batch, step_key(0, jnp.zeros((), jnp.int32)), 0.0)
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    return t(f.x_t), t(1000.0 * f.t), t(f.ehs), t(f.pooled), t(f.eps - f.x0)


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays])


def train_errors(timing_jax_out: Any, timing_torch_out: Any, to_common) -> str:
    """'loss e1, params e2' from each side's first step (loss, params in a common naming via `to_common`)."""
    from customshift_jax.numerics import relative_error

    (lj, pj), (lt, pt) = timing_jax_out, timing_torch_out
    pj, pt = to_common(pj, pt)
    keys = sorted(pt)
    return (f"loss {relative_error(np.float64(lj), np.float64(lt)):.1e}, params "
            f"{relative_error(_flat(pj[k] for k in keys), _flat(pt[k] for k in keys)):.1e}")


def lora_step_case(pair: MMDiTPair, *, batch: int, size: int, text_len: int, subject_len: int,
                   rank: int = 16, remat: str = "none") -> Case:
    """One CustomShift LoRA step (RAB prefill, CGB forward, backward, clip, AdamW) from random LoRAs and beta,
    our blocks rematerialised as `remat` (train.remat). Puts the reference's hooks on `pair.model` until the
    returned Case's `close()`."""
    import jax
    import jax.numpy as jnp
    import torch

    from customshift_jax.crosscheck.customshift import build_case
    from customshift_jax.io.lora_files import to_state_dict
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.train.optim import make_optimizer
    from customshift_jax.train.step import TrainState, make_train_step

    config = pair.config
    cs = build_case("bench", config, pair.model, params=pair.params, rank=rank, alpha=float(rank), batch=1,
                    height=2, width=2)
    lora = LoRAConfig(rank, float(rank))
    opt, _ = make_optimizer(LORA_LR)
    trainable = {"rab": cs.rab, "cgb": cs.cgb}
    state = TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable))
    data = train_batch(config, batch=batch, size=size, text_len=text_len, subject_len=subject_len)
    step = jax.jit(make_train_step(config, lora, opt, RunOptions(remat=remat), seed=0, text_dropout=0.0,
                                   ref_dropout=0.0))
    compiled, compile_s = _compile(step, state, pair.params, data)

    def run_jax():
        new, metrics = jax.block_until_ready(compiled(state, pair.params, data))
        return float(metrics["loss"]), new.trainable

    ref = cs.reference
    params = ref.lora_parameters()
    optim = torch.optim.AdamW(params, lr=LORA_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    x_t, t, ehs, pooled, target = _flow_draws(data)
    refs = [torch.from_numpy(np.array(data[k])) for k in ("ref_latents", "subject_embeds", "subject_pooled")]

    def run_torch():
        optim.zero_grad(set_to_none=True)
        with torch.enable_grad():
            v = ref.forward(x_t, t, ehs, pooled, ref.prefill(*refs), gamma=1.0)
            loss = torch.mean(torch.square(v - target))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        return loss.item(), ref.export_lora_state_dict()

    def to_common(pj, pt):
        return to_state_dict(jax.device_get(pj["rab"]), jax.device_get(pj["cgb"])), {k: v.numpy() for k, v in
                                                                                     pt.items()}

    return Case(run_jax, run_torch, compile_s, f"B{batch} {size * 8}px text {text_len} subject {subject_len} "
                f"rank {rank} remat {remat}", errors=lambda tj, tt: train_errors(tj, tt, to_common), close=cs.close,
                compiled=compiled, jax_args=(state, pair.params, data))


def base_step_case(pair: MMDiTPair, *, batch: int, size: int, text_len: int, remat: str = "none") -> Case:
    """One full-parameter step of `pair` (every weight trains; clip 1, AdamW without weight decay, EMA), the
    subject world's base training; our blocks rematerialised as `remat` (train.remat)."""
    import jax
    import torch

    from customshift_jax.models.mmdit.mapping import params_from_state_dict
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.train.base_step import init_base_train_state, make_base_train_step
    from customshift_jax.train.optim import make_optimizer

    config = pair.config
    opt, _ = make_optimizer(BASE_LR, weight_decay=0.0)
    state = init_base_train_state(pair.params, opt, ema_decay=BASE_EMA)
    data = train_batch(config, batch=batch, size=size, text_len=text_len, subject_len=1)
    data = {k: data[k] for k in ("latents", "prompt_embeds", "pooled")}
    step = jax.jit(make_base_train_step(config, opt, RunOptions(remat=remat), seed=0, ema_decay=BASE_EMA,
                                        text_dropout=0.0))
    compiled, compile_s = _compile(step, state, {}, data)

    def run_jax():
        new, metrics = jax.block_until_ready(compiled(state, {}, data))
        return float(metrics["loss"]), new.trainable

    model = pair.model.requires_grad_(True)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optim = torch.optim.AdamW(params, lr=BASE_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x_t, t, ehs, pooled, target = _flow_draws(data)

    def run_torch():
        optim.zero_grad(set_to_none=True)
        with torch.enable_grad():
            v = model(hidden_states=x_t, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled).sample
            loss = torch.mean(torch.square(v - target))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - BASE_EMA)
        return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}

    def to_common(pj, pt):
        # pos_embed is a fixed buffer in diffusers but a leaf of our params tree, which the base step trains:
        # left out of the comparison (docs/performance.md).
        ours = jax.tree_util.tree_leaves_with_path(jax.device_get(pj))
        theirs = jax.tree_util.tree_leaves(params_from_state_dict(config, {k: v.numpy() for k, v in pt.items()}))
        keep = [i for i, (path, _) in enumerate(ours) if "pos_embed" not in jax.tree_util.keystr(path)]
        return {i: ours[i][1] for i in keep}, {i: theirs[i] for i in keep}

    width = config.num_attention_heads * config.attention_head_dim
    return Case(run_jax, run_torch, compile_s, f"B{batch} {size}x{size} latents text {text_len}, "
                f"{config.num_layers} layers width {width} remat {remat}",
                errors=lambda tj, tt: train_errors(tj, tt, to_common), compiled=compiled, jax_args=(state, {}, data))
