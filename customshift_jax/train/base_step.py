"""Full-parameter training of the base SD3 MMDiT (`train.mode=base`): the rectified-flow loss of
`train.step` through the plain base forward, every MMDiT param trainable, optionally with an EMA.

The step has the LoRA step's signature, `step(state, base_params, batch)`, so the loop, the sharded wrapper
and the checkpoints treat both modes alike; here the trainable tree *is* the model and `base_params` is an
empty dict. Reference keys of the batch (ref_latents, subject_*) are ignored. The draws are those of the
LoRA loss (`flow_matching_inputs` on `step_key(seed, step)`), so a resume is exact here too.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from customshift_jax.models.mmdit.api import Params, as_dtype, build_model, make_forward
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.train.step import TrainState, flow_matching_inputs, make_step_fn, rectified_flow_loss


def init_base_train_state(params: Params, optimizer: optax.GradientTransformation, *,
                          ema_decay: float = 0.0) -> TrainState:
    """The loaded MMDiT params as fp32 master weights, their optimizer state and (ema_decay > 0) an EMA copy."""
    trainable = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    ema = jax.tree_util.tree_map(jnp.copy, trainable) if ema_decay > 0 else None
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), ema)


def model_params(state: TrainState) -> Params:
    """The weights a base run exports and samples with: the EMA when one is kept, else the trained params."""
    return state.trainable if state.ema is None else state.ema


def _forward(config: MMDiTConfig, dtype: Any, backend: str, remat: str,
             activation_sharding: Callable | None) -> Callable:
    """`api.make_forward`, or the same forward with activation constraints at block boundaries (on a mesh)."""
    if activation_sharding is None:
        return make_forward(config, dtype=dtype, backend=backend, remat=remat)
    model = build_model(config, dtype=dtype, backend=backend, remat=remat, activation_sharding=activation_sharding)
    return lambda params, *args: model.apply({"params": params}, *args)


def make_base_loss_fn(config: MMDiTConfig, *, dtype: Any = jnp.float32, remat: str = "none",
                      text_dropout: float = 0.1, backend: str = "xla",
                      activation_sharding: Callable | None = None) -> Callable:
    """Pure `loss(params, base_params, batch, key) -> (loss, aux)`; `base_params` is unused (an empty dict).

    Text dropout as in `train.step.make_loss_fn`: a dropped sample's prompt and pooled embeddings are zeros.
    """
    forward = _forward(config, as_dtype(dtype), backend, remat, activation_sharding)
    skip = np.zeros((config.num_layers,), bool)

    def loss_fn(params, base_params, batch, key):  # noqa: ARG001
        f = flow_matching_inputs(batch, key, text_dropout)
        pred = forward(params, f.x_t, 1000.0 * f.t, f.ehs, f.pooled, skip)
        return rectified_flow_loss(pred, f.x0, f.eps), f.aux()

    return loss_fn


def make_base_train_step(config: MMDiTConfig, optimizer: optax.GradientTransformation, *, seed: int,
                         schedule: optax.Schedule | None = None, accum_steps: int = 1, ema_decay: float = 0.0,
                         **loss_kw: Any) -> Callable:
    """Pure `step(state, {}, batch) -> (state, metrics)` training every MMDiT param; jit it (or shard it).

    `loss_kw`: dtype, remat, text_dropout, backend, activation_sharding (see `make_base_loss_fn`).
    """
    return make_step_fn(make_base_loss_fn(config, **loss_kw), optimizer, seed=seed, schedule=schedule,
                        accum_steps=accum_steps, ema_decay=ema_decay)
