"""Full-parameter training of the base SD3 MMDiT (`train.mode=base`): the rectified-flow loss of
`train.step` through the plain base forward, every MMDiT param trainable, optionally with an EMA.

The step has the LoRA step's signature, `step(state, base_params, batch)`, so the loop, its sharding
(`TRAIN_STEP_AXES`) and the checkpoints treat both modes alike; here the trainable tree *is* the model and
`base_params` is an empty dict. Reference keys of the batch (ref_latents, subject_*) are ignored. The draws are those of the
LoRA loss (`flow_matching_inputs` on `step_key(seed, step)`), so a resume is exact here too.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from customshift_jax.models.mmdit.api import Params, make_forward
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.options import RunOptions
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


def make_base_loss_fn(config: MMDiTConfig, options: RunOptions | None = None, *,
                      text_dropout: float = 0.1) -> Callable:
    """Pure `loss(params, base_params, batch, key) -> (loss, aux)`; `base_params` is unused (an empty dict).

    Text dropout as in `train.step.make_loss_fn`: a dropped sample's prompt and pooled embeddings are zeros.
    `options`: how the forward runs (dtype, backend, remat, activation sharding).
    """
    forward = make_forward(config, options)
    skip = np.zeros((config.num_layers,), bool)

    def loss_fn(params, base_params, batch, key):  # noqa: ARG001
        f = flow_matching_inputs(batch, key, text_dropout)
        pred = forward(params, f.x_t, 1000.0 * f.t, f.ehs, f.pooled, skip)
        return rectified_flow_loss(pred, f.x0, f.eps), f.aux()

    return loss_fn


def make_base_train_step(config: MMDiTConfig, optimizer: optax.GradientTransformation,
                         options: RunOptions | None = None, *, seed: int, schedule: optax.Schedule | None = None,
                         accum_steps: int = 1, ema_decay: float = 0.0, text_dropout: float = 0.1) -> Callable:
    """Pure `step(state, {}, batch) -> (state, metrics)` training every MMDiT param; jit it, or shard it with
    `train.step.TRAIN_STEP_AXES`."""
    return make_step_fn(make_base_loss_fn(config, options, text_dropout=text_dropout), optimizer, seed=seed,
                        schedule=schedule, accum_steps=accum_steps, ema_decay=ema_decay)
