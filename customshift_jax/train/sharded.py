"""The training step on a mesh (DESIGN section 5): `make_train_step` jitted with in/out shardings under `set_mesh`.

The frozen base params, the trainable LoRAs and their optimizer state are laid out by the rule set from
their paths (a LoRA's A takes the layout of its base kernel's input dim, B of its output dim; Adam's moments
follow their LoRA); the batch is split along "batch" and the metrics come back replicated. In train.mode=base
the trainable tree is the MMDiT itself (and its EMA), laid out by the same rules; the base argument is {}.
"""
from __future__ import annotations

from typing import Any

import optax
from jax.sharding import Mesh

from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.parallel import sharding as shd
from customshift_jax.train.base_step import make_base_train_step
from customshift_jax.train.step import make_train_step

_ARG_AXES = ("params", "params", shd.BATCH_AXES)  # (state, base params, batch)
_OUT_AXES = ("params", shd.REPLICATED)  # (state, metrics)


def make_sharded_train_step(config: MMDiTConfig, lora: LoRAConfig, optimizer: optax.GradientTransformation,
                            mesh: Mesh, rules: shd.RulesLike = "fsdp", *, seed: int,
                            schedule: optax.Schedule | None = None, accum_steps: int = 1,
                            **loss_kw: Any) -> shd.ShardedFunction:
    """`step(state, base_params, batch) -> (state, metrics)` sharded on `mesh` by `rules` (see `make_train_step`).

    Call it with host or device arrays (placed on the mesh first); the returned state keeps its layout, so
    feeding it back does not move it. `step.shardings(state, base, batch)` gives the in / out shardings.
    """
    fn = make_train_step(config, lora, optimizer, seed=seed, schedule=schedule, accum_steps=accum_steps,
                         activation_sharding=shd.activation_hook(mesh, rules), **loss_kw)
    return shd.ShardedFunction(fn, mesh, rules, _ARG_AXES, _OUT_AXES)


def make_sharded_base_train_step(config: MMDiTConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                                 rules: shd.RulesLike = "fsdp", *, seed: int, schedule: optax.Schedule | None = None,
                                 accum_steps: int = 1, **step_kw: Any) -> shd.ShardedFunction:
    """`train.base_step.make_base_train_step` sharded on `mesh` by `rules`: call it as `step(state, {}, batch)`."""
    fn = make_base_train_step(config, optimizer, seed=seed, schedule=schedule, accum_steps=accum_steps,
                              activation_sharding=shd.activation_hook(mesh, rules), **step_kw)
    return shd.ShardedFunction(fn, mesh, rules, _ARG_AXES, _OUT_AXES)
