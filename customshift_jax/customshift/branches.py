"""CustomShift's two branches as pure functions (DESIGN section 4).

`prefill` runs the Reference-Alignment Branch (RAB) once per (reference, subject name) and returns the
per-layer K/V cache; `customshift_apply` is the Cross-Guidance Branch (CGB) forward that reads it.
Both take the frozen base params plus their own LoRA tree ("lora" collection); zero LoRA and no
cache give exactly the base MMDiT.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.customshift.cads import CustomShiftAttnProcessor
from customshift_jax.models.mmdit.api import Params, _dummy_inputs, build_model, check_inputs, jitted, skip_mask
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.model import SD3Transformer
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.parallel.sharding import (
    BATCH_AXES,
    KV_AXES_FN,
    LATENT_AXES,
    REPLICATED,
    TOKEN_AXES,
    EntryAxes,
)
from customshift_jax.tree_paths import shape_mismatches

# The sharded forms are `ShardedFunction(fn, mesh, rules, *AXES)`; the cache is (layers, batch, length, heads, -).
PREFILL_AXES = EntryAxes(("params", "params", LATENT_AXES, TOKEN_AXES, BATCH_AXES), KV_AXES_FN)
CUSTOMSHIFT_FORWARD_AXES = EntryAxes(("params", "params", LATENT_AXES, BATCH_AXES, TOKEN_AXES, BATCH_AXES, REPLICATED,
                                      KV_AXES_FN, REPLICATED), LATENT_AXES)


def config_fingerprint(config: MMDiTConfig) -> str:
    """A short stable name of the architecture; a cache made for another one is refused."""
    return hashlib.sha256(repr(sorted(config.to_diffusers_config().items())).encode()).hexdigest()[:16]


@flax.struct.dataclass
class RefCache:
    """Per-layer reference K/V of [r; s] after qk-norm: {group "a:b": (K, V)}, each (L_g, B_ref, R+S, H, D).

    Constant through sampling: computed once per (reference image, subject name), reused for every
    prompt and seed. `fingerprint` names the architecture it was made with.
    """

    kv: dict[str, tuple[jax.Array, jax.Array]]
    fingerprint: str = flax.struct.field(pytree_node=False, default="")

    @property
    def batch(self) -> int:
        return next(iter(self.kv.values()))[0].shape[1]

    @property
    def length(self) -> int:
        return next(iter(self.kv.values()))[0].shape[2]

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.kv))


def check_cache(config: MMDiTConfig, cache: RefCache, batch: int) -> None:
    """Refuse a cache of another architecture or an incompatible batch, saying what would fit."""
    if cache.fingerprint != config_fingerprint(config):
        raise ValueError("the reference cache was made with another model configuration (fingerprint "
                         f"{cache.fingerprint!r}, this model {config_fingerprint(config)!r}); run prefill again "
                         "with this model.")
    if cache.batch not in (1, batch):
        raise ValueError(f"the reference cache holds {cache.batch} references but the batch is {batch}; use one "
                         "reference for the whole batch, or one per sample.")


def lora_model(config: MMDiTConfig, lora_config: LoRAConfig | None, options: RunOptions | None = None, *,
               shift: str = "cads", form: str = "two_pass", makes_beta: bool = False) -> SD3Transformer:
    """The base model's module with the LoRA hooks and CustomShift's attention processor (structure only;
    `makes_beta`: its init also creates beta); `options`: how it runs (dtype, backend, remat, returns,
    activation_sharding, ...)."""
    return build_model(config, options, lora_config=lora_config,
                       processor=CustomShiftAttnProcessor(shift, form, makes_beta))


def init_lora(config: MMDiTConfig, lora_config: LoRAConfig, rng: jax.Array, *, branch: str) -> Params:
    """Fresh LoRA params for one branch ("rab" or "cgb"; the CGB also gets beta = 0). B = 0: a no-op at start.

    Compiled so that the base params it needs to trace are never materialised.
    """
    if branch not in ("rab", "cgb"):
        raise ValueError(f"branch must be 'rab' or 'cgb', got {branch!r}.")
    model = lora_model(config, lora_config, makes_beta=branch == "cgb")
    return jax.jit(lambda key: model.init(key, *_dummy_inputs(config))["lora"])(rng)


@functools.lru_cache(maxsize=16)
def lora_shapes(config: MMDiTConfig, lora_config: LoRAConfig, branch: str) -> Params:
    """Shapes of one branch's LoRA tree (nothing allocated)."""
    return jax.eval_shape(lambda: init_lora(config, lora_config, jax.random.key(0), branch=branch))


def check_lora(config: MMDiTConfig, lora_config: LoRAConfig, lora_params: Params, branch: str) -> None:
    """Refuse a LoRA tree of another rank, targets or model, naming the first mismatching entries."""
    problems = shape_mismatches(lora_shapes(config, lora_config, branch), lora_params)
    if problems:
        raise ValueError(f"the {branch.upper()} LoRA does not fit this model with rank {lora_config.rank}: "
                         + "; ".join(problems) + ". Was it trained for another model or rank?")


def _variables(params: Params, lora_params: Params | None) -> dict:
    return {"params": params} if lora_params is None else {"params": params, "lora": lora_params}


def make_prefill(config: MMDiTConfig, lora_config: LoRAConfig | None = None,
                 options: RunOptions | None = None) -> Callable:
    """Pure RAB prefill `f(params, rab_lora, ref_latents, subject_embeds, subject_pooled) -> {group: (K, V)}`.

    Timestep 0 (the reference is clean), no skip layers; jax.jit takes it as it is (sharded: `PREFILL_AXES`).
    `options.remat` matters inside the training loss, where the RAB's activations are kept for its LoRA's
    gradient; `options.returns` is set to "kv".
    """
    model = lora_model(config, lora_config, (options or RunOptions()).replace(returns="kv"))

    def prefill_fn(params, rab_lora, ref_latents, subject_embeds, subject_pooled):
        t0 = jnp.zeros((ref_latents.shape[0],), jnp.float32)
        return model.apply(_variables(params, rab_lora), ref_latents, t0, subject_embeds, subject_pooled,
                           jnp.zeros((config.num_layers,), bool))

    return prefill_fn


def make_customshift_forward(config: MMDiTConfig, lora_config: LoRAConfig | None = None,
                             options: RunOptions | None = None,
                             *, shift: str = "cads", form: str = "two_pass") -> Callable:
    """Pure CGB forward `f(params, cgb_lora, x, t, ehs, pooled, skip_mask, ref_kv, gamma) -> sample`.

    `ref_kv` is `RefCache.kv` (or None: exactly the base forward); `gamma` a scalar, or one value per sample
    (B,) (e.g. per-sample reference dropout: 0 removes that sample's reference path); traced, no recompile.
    Sharded: `CUSTOMSHIFT_FORWARD_AXES`.
    """
    model = lora_model(config, lora_config, options, shift=shift, form=form)

    def forward(params, cgb_lora, hidden_states, timestep, encoder_hidden_states, pooled_projections, skip,
                ref_kv=None, gamma=1.0):
        return model.apply(_variables(params, cgb_lora), hidden_states, timestep, encoder_hidden_states,
                           pooled_projections, skip, ref_kv, jnp.asarray(gamma, jnp.float32))

    return forward


def prefill(config: MMDiTConfig, params: Params, ref_latents, subject_embeds, subject_pooled, *,
            rab_lora: Params | None = None, lora_config: LoRAConfig | None = None, dtype: Any = jnp.float32,
            backend: str = "xla") -> RefCache:
    """Run the Reference-Alignment Branch once: reference latents (B_ref, C, H, W) (VAE-encoded and scaled)
    and the subject name's embeddings (B_ref, S, joint_dim), (B_ref, P) -> the per-layer K/V cache."""
    ref_latents, subject_embeds, subject_pooled = map(jnp.asarray, (ref_latents, subject_embeds, subject_pooled))
    check_inputs(config, ref_latents, np.zeros(ref_latents.shape[0]), subject_embeds, subject_pooled)
    if rab_lora is not None and lora_config is None:
        raise ValueError("rab_lora was given without its LoRAConfig (rank, alpha, targets).")
    if rab_lora is not None:
        check_lora(config, lora_config, rab_lora, "rab")
    fn = jitted(make_prefill, config, lora_config, RunOptions(dtype=dtype, backend=backend))
    return RefCache(fn(params, rab_lora, ref_latents, subject_embeds, subject_pooled), config_fingerprint(config))


def customshift_apply(config: MMDiTConfig, params: Params, hidden_states, timestep, encoder_hidden_states,
                      pooled_projections, cache: RefCache | None = None, *, cgb_lora: Params | None = None,
                      lora_config: LoRAConfig | None = None, gamma: Any = 1.0, shift: str = "cads",
                      form: str = "two_pass", skip_layers: Sequence[int] | None = None, dtype: Any = jnp.float32,
                      backend: str = "xla"):
    """The Cross-Guidance Branch forward: diffusers' arguments plus the reference cache and gamma (a scalar or
    one per sample, (B,))."""
    hidden_states, encoder_hidden_states, pooled_projections = map(
        jnp.asarray, (hidden_states, encoder_hidden_states, pooled_projections))
    check_inputs(config, hidden_states, timestep, encoder_hidden_states, pooled_projections)
    if cache is not None:
        check_cache(config, cache, hidden_states.shape[0])
    if cgb_lora is not None and lora_config is None:
        raise ValueError("cgb_lora was given without its LoRAConfig (rank, alpha, targets).")
    if cgb_lora is not None:
        check_lora(config, lora_config, cgb_lora, "cgb")
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (hidden_states.shape[0],))
    fn = jitted(make_customshift_forward, config, lora_config, RunOptions(dtype=dtype, backend=backend), shift=shift,
                form=form)
    return fn(params, cgb_lora, hidden_states, timestep, encoder_hidden_states, pooled_projections,
              jnp.asarray(skip_mask(config, skip_layers)), None if cache is None else cache.kv, gamma)


__all__ = ["RefCache", "init_lora", "prefill", "customshift_apply", "make_prefill", "make_customshift_forward",
           "config_fingerprint", "build_model", "PREFILL_AXES", "CUSTOMSHIFT_FORWARD_AXES"]
