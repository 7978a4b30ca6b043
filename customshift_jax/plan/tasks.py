"""The entry points a plan compiles, with abstract arguments of real shapes (nothing is allocated).

Each task is the function `customshift train` / `generate` / `prepare` really runs, built by the same factories
with the same rules: the LoRA step (Adam, the RAB prefill inside the loss, the CGB forward), the base step, one
sampler step with CFG reading the reference cache, the whole scanned sampling loop, the prefill, and the JAX
text encoders. Sampling plans one reference for the whole batch (one subject, many prompts and seeds).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.customshift.branches import (
    CUSTOMSHIFT_FORWARD_AXES,
    PREFILL_AXES,
    lora_shapes as branch_lora_shapes,
    make_customshift_forward,
    make_prefill,
)
from customshift_jax.customshift.sampling import make_customshift_sampler
from customshift_jax.models.mmdit.api import param_shapes
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import KernelLayout, RunOptions, as_dtype
from customshift_jax.parallel import sharding as shd
from customshift_jax.sampling.sampler import Conditioning
from customshift_jax.sampling.schedule import Schedule
from customshift_jax.io.text_encoders import ENCODERS
from customshift_jax.models.text_encoders.api import abstract_encoder_params
from customshift_jax.models.text_encoders.axes import text_logical_axes
from customshift_jax.models.text_encoders.config import CLIPTextConfig, T5Config
from customshift_jax.text.jax.encoders import make_encode_fn
from customshift_jax.train.base_step import init_base_train_state, make_base_train_step
from customshift_jax.train.optim import make_optimizer
from customshift_jax.train.step import TRAIN_STEP_AXES, init_train_state, make_train_step

TASKS = ("train-lora", "train-base", "sample", "sample-step", "prefill", "encode-text")
CLIP_TOKENS = 77

# SD3's text encoders at full size (the released config.json fields the Flax encoders read).
SD3_TEXT_ENCODERS = {
    "text_encoder": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                   hidden_act="quick_gelu"),
    "text_encoder_2": CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                     projection_dim=1280, num_hidden_layers=32, num_attention_heads=20,
                                     max_position_embeddings=77, hidden_act="gelu"),
    "text_encoder_3": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one step of a plan runs: the model, the task and the run options that shape it."""

    config: MMDiTConfig
    task: str
    resolution: int
    global_batch: int
    dtype: str = "bfloat16"
    attention: str = "xla"
    remat: str = "none"
    lora_rank: int = 16
    text_length: int = 256       # T5 tokens; the prompt is 77 + this long
    steps: int = 28              # sampling loop
    guidance: bool = True        # CFG in the sampler

    @property
    def latent_side(self) -> int:
        return self.resolution // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent_side // self.config.patch_size) ** 2

    @property
    def text_tokens(self) -> int:
        return CLIP_TOKENS + self.text_length


@dataclasses.dataclass
class Compilable:
    """A function to compile on a mesh, its abstract arguments, and what one call does (for throughput)."""

    jitted: Callable[[], Any]     # () -> the jax.jit object with in/out shardings
    args: tuple                   # ShapeDtypeStructs
    fn: Callable                  # the pure function (FLOPs are counted on its jaxpr)
    items_per_call: int           # images (or references, prompts) one call produces
    item: str                     # what an item is


def _sds(shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: _sds(np.shape(x), x.dtype), tree)


def lora_shapes(config: MMDiTConfig, lora_config: LoRAConfig, branch: str) -> Any:
    """One branch's LoRA tree as plain `ShapeDtypeStruct`s, the abstract argument of a compiled task."""
    return _abstract(branch_lora_shapes(config, lora_config, branch))


def ref_kv_shapes(config: MMDiTConfig, w: Workload, batch: int, dtype: Any) -> dict:
    """The reference cache's shapes: {group: (K, V)}, each (L_g, B_ref, R+S, H, D)."""
    length = w.image_tokens + w.text_tokens
    kv = {}
    for start, stop in config.block_groups():
        shape = (stop - start, batch, length, config.num_attention_heads, config.attention_head_dim)
        kv[f"{start}:{stop}"] = (_sds(shape, dtype), _sds(shape, dtype))
    return kv


def _batch(config: MMDiTConfig, w: Workload, *, reference: bool) -> dict:
    b, side = w.global_batch, w.latent_side
    out = {"latents": _sds((b, config.in_channels, side, side)),
           "prompt_embeds": _sds((b, w.text_tokens, config.joint_attention_dim)),
           "pooled": _sds((b, config.pooled_projection_dim))}
    if reference:
        out.update(ref_latents=_sds((b, config.in_channels, side, side)),
                   subject_embeds=_sds((b, w.text_tokens, config.joint_attention_dim)),
                   subject_pooled=_sds((b, config.pooled_projection_dim)))
    return out


def _axes(spec_entry: Any) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def kernel_layout(w: Workload, mesh: Any, rules: shd.RulesLike) -> KernelLayout | None:
    """The flash kernels split batch and heads as the rules lay q (B, N, H, D) out (else XLA moves q around each
    call); None for the other backends."""
    if w.attention != "flash":
        return None
    c = w.config
    spec = tuple(shd.resolve(("batch", None, "heads", None), (w.global_batch, w.image_tokens, c.num_attention_heads,
                                                              c.attention_head_dim), mesh, rules).spec) + (None,) * 4
    return _axes(spec[0]), _axes(spec[2])


def run_options(w: Workload, mesh: Any, rules: shd.RulesLike) -> RunOptions:
    """How `w`'s entry point runs on `mesh`: its dtype, attention and remat, the activation constraints of `rules`
    and the flash kernels' layout."""
    options = RunOptions(dtype=w.dtype, backend=w.attention, remat=w.remat,
                         kernel_layout=kernel_layout(w, mesh, rules))
    return shd.on_mesh(options, mesh, rules)


def build(w: Workload, mesh: Any, rules: shd.RulesLike) -> Compilable:
    """The task's sharded entry point on `mesh` under `rules`, with abstract arguments of `w`'s shapes."""
    config, dtype = w.config, as_dtype(w.dtype)
    lora_config = LoRAConfig(rank=w.lora_rank, alpha=float(w.lora_rank))
    base = _abstract(param_shapes(config, dtype))
    options = run_options(w, mesh, rules)
    if w.task in ("train-lora", "train-base"):
        optimizer, _ = make_optimizer(1e-4)
        if w.task == "train-lora":
            state = _abstract(jax.eval_shape(lambda: init_train_state(config, lora_config, optimizer, 0)))
            fn = make_train_step(config, lora_config, optimizer, options, seed=0)
            args = (state, base, _batch(config, w, reference=True))
        else:
            state = _abstract(jax.eval_shape(lambda p: init_base_train_state(p, optimizer), base))
            fn = make_base_train_step(config, optimizer, options, seed=0)
            args = (state, {}, _batch(config, w, reference=False))
        step = shd.ShardedFunction(fn, mesh, rules, *TRAIN_STEP_AXES)
        return Compilable(lambda: step.jitted(*args), args, step.fn, w.global_batch, "images")
    if w.task == "prefill":
        fn = shd.ShardedFunction(make_prefill(config, lora_config, options.replace(remat="none")), mesh, rules,
                                 *PREFILL_AXES)
        b = w.global_batch
        args = (base, lora_shapes(config, lora_config, "rab"),
                _sds((b, config.in_channels, w.latent_side, w.latent_side)),
                _sds((b, w.text_tokens, config.joint_attention_dim)), _sds((b, config.pooled_projection_dim)))
        return Compilable(lambda: fn.jitted(*args), args, fn.fn, b, "references")
    if w.task == "sample-step":
        fn = shd.ShardedFunction(make_customshift_forward(config, lora_config, options), mesh, rules,
                                 *CUSTOMSHIFT_FORWARD_AXES)
        b = w.global_batch * (2 if w.guidance else 1)  # CFG runs [negative; positive] in one call
        args = (base, lora_shapes(config, lora_config, "cgb"),
                _sds((b, config.in_channels, w.latent_side, w.latent_side)),
                _sds((b,)), _sds((b, w.text_tokens, config.joint_attention_dim)),
                _sds((b, config.pooled_projection_dim)), _sds((config.num_layers,), jnp.bool_),
                ref_kv_shapes(config, w, 1, dtype), _sds(()))
        return Compilable(lambda: fn.jitted(*args), args, fn.fn, w.global_batch, "images per step")
    if w.task == "sample":
        run = make_customshift_sampler(config, lora_config, options.replace(remat="none"), mesh=mesh, rules=rules)
        fn = run.sharded[w.guidance]
        b = w.global_batch
        emb, pooled = _sds((b, w.text_tokens, config.joint_attention_dim)), _sds((b, config.pooled_projection_dim))
        cond = Conditioning(emb, pooled, emb if w.guidance else None, pooled if w.guidance else None)
        args = ({"base": base, "cgb": lora_shapes(config, lora_config, "cgb")},
                _sds((b, config.in_channels, w.latent_side, w.latent_side)), cond,
                Schedule(_sds((w.steps + 1,)), _sds((w.steps,))), _sds(()), None,
                {"ref_kv": ref_kv_shapes(config, w, 1, dtype), "gamma": _sds(())}, None)
        return Compilable(lambda: fn.jitted(*args), args, fn.fn, b, "images")
    if w.task == "encode-text":
        return _text_encoders(w, mesh, rules, dtype)
    raise ValueError(f"unknown task {w.task!r}; known: {', '.join(TASKS)}.")


def _text_encoders(w: Workload, mesh: Any, rules: shd.RulesLike, dtype: Any) -> Compilable:
    """SD3's three encoders at full size, sharded by the same rules, on `global_batch` prompts."""
    hook = shd.activation_hook(mesh, rules)
    fn = make_encode_fn(SD3_TEXT_ENCODERS, dtype=dtype, activation_sharding=hook)
    params = {n: _abstract(abstract_encoder_params(SD3_TEXT_ENCODERS[n])) for n in ENCODERS}
    params = jax.tree_util.tree_map(lambda x: _sds(x.shape, dtype), params)
    b = w.global_batch
    ids = {"text_encoder": _sds((b, CLIP_TOKENS), jnp.int32), "text_encoder_2": _sds((b, CLIP_TOKENS), jnp.int32),
           "text_encoder_3": _sds((b, w.text_length), jnp.int32)}
    ids_sh = {k: shd.logical_sharding(("batch", None), v.shape, mesh, rules) for k, v in ids.items()}
    out_sh = (shd.logical_sharding(("batch", None, None), (b, w.text_tokens, 4096), mesh, rules),
              shd.logical_sharding(("batch", None), (b, 2048), mesh, rules))
    param_sh = shd.param_shardings(params, mesh, rules, text_logical_axes)
    jitted = jax.jit(fn, in_shardings=(param_sh, ids_sh), out_shardings=out_sh, keep_unused=True)
    return Compilable(lambda: jitted, (params, ids), fn, b, "prompts")
