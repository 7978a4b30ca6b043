"""The training step on a mesh (DESIGN section 5): `make_train_step` jitted with in/out shardings under `set_mesh`.

The frozen base params, the trainable LoRAs and their optimizer state are laid out by the rule set from
their paths (a LoRA's A takes the layout of its base kernel's input dim, B of its output dim; Adam's moments
follow their LoRA); the batch is split along "batch" and the metrics come back replicated.
"""
from __future__ import annotations

from typing import Any

import optax
from jax.sharding import Mesh

from customshift_jax import sharding as shd
from customshift_jax.config import MMDiTConfig
from customshift_jax.lora import LoRAConfig
from train.step import make_train_step


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
    return shd.ShardedFunction(fn, mesh, rules, ("params", "params", shd.BATCH_AXES), ("params", shd.REPLICATED))
