"""The public functional API of the MMDiT: init, load, and a forward that mirrors diffusers' arguments."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.model import SD3Transformer
from customshift_jax.models.mmdit.options import RunOptions

Params = dict[str, Any]


def build_model(config: MMDiTConfig, options: RunOptions | None = None, **fields: Any) -> SD3Transformer:
    """The one builder of the Flax module, for every entry point (a structure only: params live outside it).

    `options` (default `RunOptions()`) with `fields` replaced, e.g. `build_model(config, dtype="bf16")`."""
    return SD3Transformer(config, (options or RunOptions()).replace(**fields))


def _dummy_inputs(config: MMDiTConfig, batch: int = 1):
    side = 2 * config.patch_size
    return (jnp.zeros((batch, config.in_channels, side, side), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, config.joint_attention_dim), jnp.float32),
            jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
            jnp.zeros((config.num_layers,), bool))


def init_mmdit(config: MMDiTConfig, rng: jax.Array, *, param_dtype: Any = jnp.float32) -> Params:
    """Random params for `config` (a plain pytree; the scanned block groups carry a leading layer axis)."""
    model = build_model(config, param_dtype=param_dtype)
    return model.init(rng, *_dummy_inputs(config))["params"]


@functools.lru_cache(maxsize=None)
def param_shapes(config: MMDiTConfig, param_dtype: Any = jnp.float32) -> Params:
    """Shapes and dtypes of the params of `config` (`jax.ShapeDtypeStruct` leaves), nothing allocated."""
    return jax.eval_shape(functools.partial(init_mmdit, config, param_dtype=param_dtype), jax.random.key(0))


def skip_mask(config: MMDiTConfig, skip_layers: Sequence[int] | None) -> np.ndarray:
    """diffusers' `skip_layers` list as a (num_layers,) bool mask; an index outside the model is an error."""
    mask = np.zeros((config.num_layers,), bool)
    for i in skip_layers or ():
        if not 0 <= int(i) < config.num_layers:
            raise ValueError(f"skip_layers index {i} is outside 0..{config.num_layers - 1}.")
        mask[int(i)] = True
    return mask


def make_forward(config: MMDiTConfig, options: RunOptions | None = None) -> Callable:
    """A pure forward `f(params, hidden_states, timestep, encoder_hidden_states, pooled, skip_mask)`.

    `jax.jit` takes it as it is; on a mesh, `ShardedFunction(forward, mesh, rules, *FORWARD_AXES)` of
    `parallel.sharding` (with `options.activation_sharding` set). Params may be fp32 or bf16; compute in
    `options.dtype`; `options.returns` says what comes back.
    """
    model = build_model(config, options)

    def forward(params, hidden_states, timestep, encoder_hidden_states, pooled_projections, skip):
        return model.apply({"params": params}, hidden_states, timestep, encoder_hidden_states,
                           pooled_projections, skip)

    return forward


@functools.lru_cache(maxsize=64)
def jitted(factory: Callable[..., Callable], *args: Any, **kwargs: Any) -> Callable:
    """`jax.jit(factory(*args, **kwargs))`, built once per (hashable) arguments: what the eager entry points
    (`mmdit_apply`, `customshift.prefill`, ...) call, so a second call with the same options does not retrace."""
    return jax.jit(factory(*args, **kwargs))


def check_inputs(config: MMDiTConfig, hidden_states, timestep, encoder_hidden_states, pooled_projections) -> None:
    """Shape checks that say what was expected, before anything is traced."""
    if hidden_states.ndim != 4 or hidden_states.shape[1] != config.in_channels:
        raise ValueError(f"hidden_states must be (B, {config.in_channels}, H, W); got {tuple(hidden_states.shape)}.")
    b, _, h, w = hidden_states.shape
    p, m = config.patch_size, config.pos_embed_max_size
    if not config.latent_fits(h, w):
        if h % p or w % p:
            raise ValueError(f"latent height and width must be multiples of patch_size {p}; got {h}x{w}.")
        raise ValueError(f"latent grid {h // p}x{w // p} exceeds pos_embed_max_size {m}.")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (b, config.joint_attention_dim):
        raise ValueError(f"encoder_hidden_states must be ({b}, M, {config.joint_attention_dim}); "
                         f"got {tuple(encoder_hidden_states.shape)}.")
    if tuple(pooled_projections.shape) != (b, config.pooled_projection_dim):
        raise ValueError(f"pooled_projections must be ({b}, {config.pooled_projection_dim}); "
                         f"got {tuple(pooled_projections.shape)}.")
    if np.ndim(timestep) > 1 or (np.ndim(timestep) == 1 and np.shape(timestep)[0] not in (1, b)):
        raise ValueError(f"timestep must be a scalar or shape ({b},); got {tuple(np.shape(timestep))}.")


def mmdit_apply(
    config: MMDiTConfig,
    params: Params,
    hidden_states,
    timestep,
    encoder_hidden_states,
    pooled_projections,
    skip_layers: Sequence[int] | None = None,
    *,
    dtype: Any = jnp.float32,
    backend: str = "xla",
    return_block_outputs: bool = False,
):
    """`SD3Transformer2DModel.forward(...).sample` in JAX: same arguments, layout and meaning.

    hidden_states (B, C, H, W), timestep (B,) on the 0-1000 scale, encoder_hidden_states (B, M, 4096-ish),
    pooled_projections (B, P); numpy or jax arrays. With `return_block_outputs`, also the per-block
    (image, text) hidden states as a list of (x (L, B, N, D), c (L, B, M, D)) per block group.
    """
    hidden_states = jnp.asarray(hidden_states)
    encoder_hidden_states = jnp.asarray(encoder_hidden_states)
    pooled_projections = jnp.asarray(pooled_projections)
    check_inputs(config, hidden_states, timestep, encoder_hidden_states, pooled_projections)
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (hidden_states.shape[0],))
    returns = "sample_and_blocks" if return_block_outputs else "sample"
    options = RunOptions(dtype=dtype, backend=backend, returns=returns)
    fn = jitted(make_forward, config, options)
    return fn(params, hidden_states, timestep, encoder_hidden_states, pooled_projections,
              jnp.asarray(skip_mask(config, skip_layers)))
