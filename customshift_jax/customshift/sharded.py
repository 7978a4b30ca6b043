"""The CustomShift branches sharded on a mesh: the RAB prefill and the CGB forward wrapped by the one sharding
wrapper (`parallel.sharding.ShardedFunction`), with the reference cache laid out (layers, batch, length, heads, -)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from customshift_jax.customshift.branches import make_customshift_forward, make_prefill
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.parallel.sharding import (
    BATCH_AXES,
    KV_AXES_FN,
    LATENT_AXES,
    REPLICATED,
    TOKEN_AXES,
    RulesLike,
    ShardedFunction,
    activation_hook,
)


def make_sharded_prefill(config: MMDiTConfig, mesh: Mesh, rules: RulesLike = "fsdp", lora: Any = None, *,
                         dtype: Any = jnp.float32, backend: str = "xla") -> ShardedFunction:
    """The RAB prefill `f(params, rab_lora, ref_latents, subject_embeds, subject_pooled) -> {group: (K, V)}`
    sharded on `mesh`; the cache comes out laid out as (layers, batch, length, heads, -)."""
    fn = make_prefill(config, lora, dtype=dtype, backend=backend, activation_sharding=activation_hook(mesh, rules))
    axes = ("params", "params", LATENT_AXES, TOKEN_AXES, BATCH_AXES)
    return ShardedFunction(fn, mesh, rules, axes, KV_AXES_FN)


def make_sharded_customshift_forward(config: MMDiTConfig, mesh: Mesh, rules: RulesLike = "fsdp", lora: Any = None,
                                     *, shift: str = "cads", form: str = "two_pass", dtype: Any = jnp.float32,
                                     backend: str = "xla", remat: str = "none") -> ShardedFunction:
    """The CGB forward `f(params, cgb_lora, x, t, ehs, pooled, skip_mask, ref_kv, gamma)` sharded on `mesh`."""
    fn = make_customshift_forward(config, lora, shift=shift, form=form, dtype=dtype, backend=backend, remat=remat,
                                  activation_sharding=activation_hook(mesh, rules))
    axes = ("params", "params", LATENT_AXES, BATCH_AXES, TOKEN_AXES, BATCH_AXES, REPLICATED,
            KV_AXES_FN, REPLICATED)
    return ShardedFunction(fn, mesh, rules, axes, LATENT_AXES)
