"""Sampling with CustomShift: the SD3 sampler whose forward is the Cross-Guidance Branch reading the cache.

The reference cache is a jit input computed once outside the scan over steps (DESIGN section 4); both CFG
passes read it. `recompute_rab=True` instead runs the Reference-Alignment Branch inside every step: the
same numbers at a higher cost, kept for tests and benchmarks. `make_sharded_customshift_sampler` runs the
same sampler on a mesh (DESIGN section 5).
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from customshift_jax.customshift.branches import make_customshift_forward, make_prefill
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.parallel import sharding as shd
from customshift_jax.sampling import make_sampler, make_sharded_sampler


def _forward(config: MMDiTConfig, lora: LoRAConfig | None, *, shift: str, form: str, dtype: Any, backend: str,
             recompute_rab: bool, activation_sharding: Callable | None = None) -> Callable:
    """The sampler's `forward(params, x, t, ehs, pooled, skip, *, gamma, ref_kv | ref inputs)`: CGB (+ RAB)."""
    cgb = make_customshift_forward(config, lora, shift=shift, form=form, dtype=dtype, backend=backend,
                                   activation_sharding=activation_sharding)
    rab = make_prefill(config, lora, dtype=dtype, backend=backend,
                       activation_sharding=activation_sharding) if recompute_rab else None

    def forward(params, x, t, ehs, pooled, skip, *, gamma, ref_kv=None, ref_latents=None, subject_embeds=None,
                subject_pooled=None):
        if rab is not None:
            ref_kv = rab(params["base"], params.get("rab"), ref_latents, subject_embeds, subject_pooled)
        return cgb(params["base"], params.get("cgb"), x, t, ehs, pooled, skip, ref_kv, gamma)

    return forward


def make_customshift_sampler(config: MMDiTConfig, lora: LoRAConfig | None = None, *, shift: str = "cads",
                             form: str = "two_pass", dtype: Any = jnp.float32, backend: str = "xla",
                             recompute_rab: bool = False, **sampler_kw) -> Callable:
    """A jitted sampler `run(params, latents, cond, schedule, *, guidance_scale, extra, ...)` (see `make_sampler`).

    params: {"base": MMDiT params, "cgb": tree or None (and "rab" with `recompute_rab`)}.
    extra: {"ref_kv": RefCache.kv, "gamma": scalar}; with `recompute_rab`, {"ref_latents", "subject_embeds",
    "subject_pooled", "gamma"} instead.
    """
    forward = _forward(config, lora, shift=shift, form=form, dtype=dtype, backend=backend,
                       recompute_rab=recompute_rab)
    return make_sampler(config, forward=forward, dtype=dtype, backend=backend, **sampler_kw)


def make_sharded_customshift_sampler(config: MMDiTConfig, mesh: Any, rules: Any = "fsdp",
                                     lora: LoRAConfig | None = None, *, shift: str = "cads", form: str = "two_pass",
                                     dtype: Any = jnp.float32, backend: str = "xla", recompute_rab: bool = False,
                                     **sampler_kw) -> Callable:
    """`make_customshift_sampler` on `mesh` under `rules`: jitted with in/out shardings inside `jax.set_mesh`.

    Same `run(...)` and inputs. Base params and LoRAs are laid out by path, the reference cache as
    (layers, batch, length, heads, -) (a one-sample reference keeps its batch whole), gamma replicated.
    """
    forward = _forward(config, lora, shift=shift, form=form, dtype=dtype, backend=backend,
                       recompute_rab=recompute_rab, activation_sharding=shd.activation_hook(mesh, rules))
    extra_axes = {"ref_kv": shd.KV_AXES_FN, "ref_latents": shd.LATENT_AXES, "subject_embeds": shd.TOKEN_AXES,
                  "subject_pooled": shd.BATCH_AXES, "gamma": shd.REPLICATED}
    return make_sharded_sampler(config, mesh, rules, forward=forward, extra_axes=extra_axes, dtype=dtype,
                                backend=backend, **sampler_kw)
