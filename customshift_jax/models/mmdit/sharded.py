"""The MMDiT forward on a mesh: the pure forward with `parallel.sharding`'s activation constraints at block
boundaries, and wrapped by the sharding wrapper (`ShardedFunction`)."""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from jax.sharding import Mesh

from customshift_jax.models.mmdit.api import build_model
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.parallel import sharding as shd


def constrained_forward(config: MMDiTConfig, mesh: Mesh, rules: shd.RulesLike = "fsdp", *, dtype: Any = jnp.float32,
                        backend: str = "xla", remat: str = "none") -> Callable:
    """`api.make_forward`'s pure forward with the activation constraints of `rules` at block boundaries (not jitted)."""
    model = build_model(config, dtype=dtype, backend=backend, remat=remat,
                        activation_sharding=shd.activation_hook(mesh, rules))

    def forward(params, hidden_states, timestep, encoder_hidden_states, pooled_projections, skip):
        return model.apply({"params": params}, hidden_states, timestep, encoder_hidden_states,
                           pooled_projections, skip)

    return forward


def make_sharded_forward(config: MMDiTConfig, mesh: Mesh, rules: shd.RulesLike = "fsdp", *, dtype: Any = jnp.float32,
                         backend: str = "xla", remat: str = "none") -> shd.ShardedFunction:
    """The MMDiT forward `f(params, hidden_states, timestep, ehs, pooled, skip_mask)` sharded on `mesh`."""
    forward = constrained_forward(config, mesh, rules, dtype=dtype, backend=backend, remat=remat)
    axes = ("params", shd.LATENT_AXES, shd.BATCH_AXES, shd.TOKEN_AXES, shd.BATCH_AXES, shd.REPLICATED)
    return shd.ShardedFunction(forward, mesh, rules, axes, shd.LATENT_AXES)
