"""Sampling with CustomShift: the SD3 sampler whose forward is the Cross-Guidance Branch reading the cache.

The reference cache is a jit input computed once outside the scan over steps (DESIGN section 4); both CFG
passes read it. `recompute_rab=True` instead runs the Reference-Alignment Branch inside every step: the
same numbers at a higher cost, kept for tests and benchmarks. With a `mesh`, the same sampler runs sharded
(DESIGN section 5). Reference guidance (`extra["reference_scale"]` = s): each forward also runs without the
reference (gamma 0) and returns v_without + s (v_with - v_without), a guidance scale of its own for the
reference, on top of CFG's for the text; s = 1 is the plain sampler.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from customshift_jax.customshift.branches import make_customshift_forward, make_prefill
from customshift_jax.customshift.cads import GAMMA_FREE
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.parallel import sharding as shd
from customshift_jax.sampling import make_sampler

# The axes of the sampler's `extra` inputs on a mesh: the cache (layers, batch, length, heads, -), gamma whole.
EXTRA_AXES = {"ref_kv": shd.KV_AXES_FN, "ref_latents": shd.LATENT_AXES, "subject_embeds": shd.TOKEN_AXES,
              "subject_pooled": shd.BATCH_AXES, "gamma": shd.REPLICATED, "reference_scale": shd.REPLICATED}


def _forward(config: MMDiTConfig, lora_config: LoRAConfig | None, options: RunOptions, *, shift: str, form: str,
             recompute_rab: bool) -> Callable:
    """The sampler's `forward(params, x, t, ehs, pooled, skip, *, gamma, ref_kv | ref inputs)`: CGB (+ RAB)."""
    cgb = make_customshift_forward(config, lora_config, options, shift=shift, form=form)
    rab = make_prefill(config, lora_config, options) if recompute_rab else None

    def forward(params, x, t, ehs, pooled, skip, *, gamma, ref_kv=None, ref_latents=None, subject_embeds=None,
                subject_pooled=None, reference_scale=None):
        if rab is not None:
            ref_kv = rab(params["base"], params.get("rab"), ref_latents, subject_embeds, subject_pooled)
        if reference_scale is None:
            return cgb(params["base"], params.get("cgb"), x, t, ehs, pooled, skip, ref_kv, gamma)
        if shift in GAMMA_FREE:
            raise ValueError(f"reference guidance works through gamma = 0, which shift='{shift}' ignores.")
        n = x.shape[0]  # one call on [x; x]: with the reference at gamma, then without it (gamma 0)
        g = jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (n,))
        twice = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731
        v = cgb(params["base"], params.get("cgb"), twice(x), twice(t), twice(ehs), twice(pooled), skip, ref_kv,
                jnp.concatenate([g, jnp.zeros_like(g)]))
        with_ref, without = v[:n], v[n:]
        return without + jnp.asarray(reference_scale, v.dtype) * (with_ref - without)

    return forward


def make_customshift_sampler(config: MMDiTConfig, lora_config: LoRAConfig | None = None,
                             options: RunOptions | None = None,
                             *, shift: str = "cads", form: str = "two_pass", recompute_rab: bool = False,
                             mesh: Any = None, rules: Any = "fsdp", **sampler_kw: Any) -> Callable:
    """A jitted sampler `run(params, latents, cond, schedule, *, guidance_scale, extra, ...)` (see `make_sampler`).

    params: {"base": MMDiT params, "cgb": tree or None (and "rab" with `recompute_rab`)}.
    extra: {"ref_kv": RefCache.kv, "gamma": scalar}; with `recompute_rab`, {"ref_latents", "subject_embeds",
    "subject_pooled", "gamma"} instead. With a `mesh`: sharded under `rules` (base params and LoRAs laid out by
    path, `extra` by `EXTRA_AXES`; a one-sample reference keeps its batch whole), with the activation
    constraints of `rules` unless `options.activation_sharding` is set.
    """
    options = shd.on_mesh(options or RunOptions(), mesh, rules)
    forward = _forward(config, lora_config, options, shift=shift, form=form, recompute_rab=recompute_rab)
    return make_sampler(config, options, forward=forward, mesh=mesh, rules=rules,
                        extra_axes=EXTRA_AXES if mesh is not None else None, **sampler_kw)
