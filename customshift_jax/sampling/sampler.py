"""Flow-match Euler sampling with classifier-free and skip-layer guidance, as diffusers' SD3 pipeline does it,
written as one pure function with `lax.scan` over the steps (DESIGN section 4, "Sampling").

The model call is a generic `forward(params, x, t, ehs, pooled, skip_mask, **extra)` with the signature of
`make_forward`'s result plus optional keyword inputs (`extra`, a pytree that is a jit input, e.g. the
CustomShift reference K/V cache), so another branch can reuse the loop unchanged.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.models.mmdit.api import check_inputs, make_forward
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.options import RunOptions, as_dtype
from customshift_jax.models.vae import unscale_latents, vae_decode
from customshift_jax.parallel import sharding as shd
from customshift_jax.sampling.schedule import Schedule

Array = jax.Array
# forward(params, hidden_states (B,C,H,W), timestep (B,) 0-1000, ehs (B,M,J), pooled (B,P), skip_mask (L,) bool,
#         **extra) -> velocity (B,C,H,W)
Forward = Callable[..., Array]

# diffusers' StableDiffusion3Pipeline.__call__ defaults for skip-layer guidance.
SLG_SCALE, SLG_START, SLG_STOP = 2.8, 0.01, 0.2


@flax.struct.dataclass
class Conditioning:
    """Text conditioning of one batch: the prompt's embeddings and, for CFG, the negative prompt's (same shapes)."""

    prompt_embeds: Any  # (B, M, J)
    pooled_prompt_embeds: Any  # (B, P)
    negative_prompt_embeds: Any = None  # (B, M, J) or None
    negative_pooled_prompt_embeds: Any = None  # (B, P) or None

    @property
    def has_negative(self) -> bool:
        """True when the negatives (needed for classifier-free guidance) are present."""
        return self.negative_prompt_embeds is not None

    @classmethod
    def from_prompt_embeds(cls, embeds: Any) -> "Conditioning":
        """From a `customshift_jax.text.PromptEmbeds` (or anything with the same four attributes)."""
        return cls(embeds.prompt_embeds, embeds.pooled_prompt_embeds,
                   getattr(embeds, "negative_prompt_embeds", None),
                   getattr(embeds, "negative_pooled_prompt_embeds", None))


@flax.struct.dataclass
class SkipLayerGuidance:
    """Skip-layer guidance as arrays (jit inputs, so changing them does not recompile).

    skip_mask (L,) bool: the layers the third pass skips; scale () float32; active (T,) bool: the steps that run
    the third pass, computed on the host exactly as the pipeline's float64 test `start*T < i < stop*T`.
    """

    skip_mask: Any  # (L,) bool
    scale: Any  # () float32
    active: Any  # (T,) bool


def slg_active_steps(num_steps: int, start: float = SLG_START, stop: float = SLG_STOP) -> np.ndarray:
    """(T,) bool: step i runs the skip-layer pass iff `i > T * start and i < T * stop` (diffusers, in float64)."""
    return np.array([i > num_steps * start and i < num_steps * stop for i in range(num_steps)], bool)


def skip_layer_guidance(config: MMDiTConfig | int, layers: Sequence[int], num_steps: int, *, scale: float = SLG_SCALE,
                        start: float = SLG_START, stop: float = SLG_STOP) -> SkipLayerGuidance:
    """diffusers' `skip_guidance_layers=, skip_layer_guidance_scale/start/stop=` as a `SkipLayerGuidance`.

    `start` and `stop` are fractions of the step count; `config` may be an `MMDiTConfig` or the number of layers.
    """
    num_layers = config if isinstance(config, int) else config.num_layers
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("skip_layer_guidance: `layers` is empty; pass None instead of SLG to turn it off.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"skip_layer_guidance: layers {bad} are outside 0..{num_layers - 1}.")
    mask = np.zeros((num_layers,), bool)
    mask[layers] = True
    return SkipLayerGuidance(skip_mask=mask, scale=np.float32(scale), active=slg_active_steps(num_steps, start, stop))


def initial_latents(key: Array, shape: Sequence[int]) -> Array:
    """Initial noise x_T ~ N(0, 1), float32, of `shape` (B, C, h, w): same key, same noise.

    Equal to `jax.random.normal(key, shape)`, drawn flat and reshaped: XLA:CPU compiles the 4-D form ~10x slower.
    """
    shape = tuple(int(d) for d in shape)
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def noise_for(keys: Sequence[Array], shape: Sequence[int]) -> np.ndarray:
    """(B, *shape) noise x_T, image b drawn from keys[b] alone: an image's noise does not depend on its batch."""
    return np.concatenate([np.asarray(initial_latents(k, (1, *shape))) for k in keys])


def latent_shape(config: MMDiTConfig, batch: int, height: int, width: int, vae_scale_factor: int = 8) -> tuple:
    """(B, C, height / f, width / f) for an image of height x width pixels; refuses sizes the pipeline refuses."""
    multiple = vae_scale_factor * config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be divisible by {multiple} (VAE scale factor {vae_scale_factor} x "
                         f"patch size {config.patch_size}), got {height}x{width}; e.g. "
                         f"{height - height % multiple}x{width - width % multiple}.")
    return (int(batch), config.in_channels, height // vae_scale_factor, width // vae_scale_factor)


def _shape(a: Any) -> tuple:
    """Shape of an array, tracer, `jax.ShapeDtypeStruct` or nested list."""
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def check_sample_inputs(latents: Any, cond: Conditioning, schedule: Schedule, *, cfg: bool,
                        slg: SkipLayerGuidance | None, num_layers: int) -> None:
    """Shape checks on the sampler's inputs that name what was expected (static shapes: works under tracing)."""
    shape = _shape(latents)
    if len(shape) != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {shape}.")
    b = shape[0]
    pe, pooled = _shape(cond.prompt_embeds), _shape(cond.pooled_prompt_embeds)
    if len(pe) != 3 or pe[0] != b:
        raise ValueError(f"prompt_embeds must be ({b}, M, J) for latents of batch {b}, got {pe}.")
    if len(pooled) != 2 or pooled[0] != b:
        raise ValueError(f"pooled_prompt_embeds must be ({b}, P) for latents of batch {b}, got {pooled}.")
    if cfg:
        if cond.negative_prompt_embeds is None or cond.negative_pooled_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 (classifier-free guidance) needs negative_prompt_embeds and "
                             "negative_pooled_prompt_embeds in the Conditioning (e.g. the empty prompt's).")
        npe, npooled = _shape(cond.negative_prompt_embeds), _shape(cond.negative_pooled_prompt_embeds)
        if npe != pe or npooled != pooled:
            raise ValueError(f"negative embeddings must have the prompt's shapes {pe} and {pooled}, "
                             f"got {npe} and {npooled}.")
    t = _shape(schedule.timesteps)
    if len(t) != 1 or t[0] < 1 or _shape(schedule.sigmas) != (t[0] + 1,):
        raise ValueError(f"schedule must hold timesteps (T,) and sigmas (T+1,), got {t} and "
                         f"{_shape(schedule.sigmas)}; build it with make_schedule.")
    if slg is not None:
        if _shape(slg.skip_mask) != (num_layers,):
            raise ValueError(f"SkipLayerGuidance.skip_mask must be ({num_layers},), got {_shape(slg.skip_mask)}.")
        if _shape(slg.active) != t:
            raise ValueError(f"SkipLayerGuidance was built for {_shape(slg.active)[0]} steps but the schedule has "
                             f"{t[0]}; build it with skip_layer_guidance(..., num_steps={t[0]}).")


def sample(
    forward: Forward,
    params: Any,
    latents: Array,
    cond: Conditioning,
    schedule: Schedule,
    *,
    guidance_scale: float | Array,
    num_layers: int,
    slg: SkipLayerGuidance | None = None,
    extra: Mapping[str, Any] | None = None,
    cfg: bool | None = None,
    progress: Callable[[Any], None] | None = None,
) -> Array:
    """Run T flow-match Euler steps from `latents` (B, C, H, W) (the noise x_T) and return z_0 (B, C, H, W) float32.

    Same math as `StableDiffusion3Pipeline.__call__` + `FlowMatchEulerDiscreteScheduler.step`: CFG batches
    [negative; positive] in one call, `uncond + g * (text - uncond)`; SLG (CFG only, steps `slg.active`) adds
    `(text - skipped) * scale` with a third call on the positive embeddings only; the step is
    `x + (sigma_next - sigma) * v` in float32. `cfg` defaults to `guidance_scale > 1` (then `guidance_scale`
    must be a Python number; pass `cfg` explicitly to make it a traced value). `extra` is passed to every
    forward call as keyword arguments, unchanged (the forward broadcasts it over the batch it gets: 2B for
    the CFG call, B for the others). `progress(step_index)` is called on the host after each step (an
    unordered `jax.debug.callback`: it does not hold the loop back). Pure: jit it with `forward` closed over.
    """
    if cfg is None:
        try:
            cfg = bool(guidance_scale > 1)
        except jax.errors.ConcretizationTypeError:
            raise ValueError("guidance_scale is traced: pass cfg=True/False to say whether to run "
                             "classifier-free guidance (diffusers runs it iff guidance_scale > 1).") from None
    check_sample_inputs(latents, cond, schedule, cfg=cfg, slg=slg, num_layers=num_layers)
    if slg is not None and not cfg:
        warnings.warn("skip-layer guidance is ignored without classifier-free guidance (guidance_scale <= 1), "
                      "as in diffusers' StableDiffusion3Pipeline.", stacklevel=2)
        slg = None
    extra = dict(extra or {})
    x = jnp.asarray(latents, jnp.float32)
    b = x.shape[0]
    no_skip = jnp.zeros((num_layers,), bool)
    g = jnp.asarray(guidance_scale, jnp.float32)
    pe, pooled = jnp.asarray(cond.prompt_embeds), jnp.asarray(cond.pooled_prompt_embeds)
    if cfg:
        ehs = jnp.concatenate([jnp.asarray(cond.negative_prompt_embeds), pe], axis=0)  # (2B, M, J)
        pooled_cfg = jnp.concatenate([jnp.asarray(cond.negative_pooled_prompt_embeds), pooled], axis=0)  # (2B, P)

    def model(x_in, t, ehs_in, pooled_in, skip):
        t_b = jnp.broadcast_to(t, (x_in.shape[0],))  # (N,): diffusers' t.expand(N)
        return forward(params, x_in, t_b, ehs_in, pooled_in, skip, **extra).astype(jnp.float32)

    def step(x, xs):
        index, t, sigma, sigma_next, slg_on = xs
        if cfg:
            v = model(jnp.concatenate([x, x], axis=0), t, ehs, pooled_cfg, no_skip)  # (2B, C, H, W)
            v_uncond, v_text = v[:b], v[b:]
            v = v_uncond + g * (v_text - v_uncond)
            if slg is not None:
                def with_slg(v):
                    v_skip = model(x, t, pe, pooled, jnp.asarray(slg.skip_mask, bool))
                    return v + (v_text - v_skip) * jnp.asarray(slg.scale, jnp.float32)

                v = jax.lax.cond(slg_on, with_slg, lambda v: v, v)
        else:
            v = model(x, t, pe, pooled, no_skip)
        dt = sigma_next - sigma  # float32, as the scheduler
        x = x + dt * v
        if progress is not None:
            jax.debug.callback(progress, index)
        return x, None

    sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
    timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
    active = jnp.asarray(slg.active, bool) if slg is not None else jnp.zeros(timesteps.shape, bool)
    steps = jnp.arange(timesteps.shape[0])
    x, _ = jax.lax.scan(step, x, (steps, timesteps, sigmas[:-1], sigmas[1:], active))
    return x


def _sampler_parts(config: MMDiTConfig, *, forward: Forward, decode: bool, vae_config: Any, vae_dtype: Any,
                   progress: Callable[[Any], None] | None) -> tuple[Callable, int]:
    """(pure, vae scale factor): `pure(params, latents, cond, schedule, guidance_scale, slg, extra, vae_params, *,
    cfg)`, the sampler as one function to jit."""
    if decode and vae_config is None:
        raise ValueError("make_sampler(decode=True) needs vae_config (e.g. from customshift_jax.io.loading.load_vae).")

    def pure(params, latents, cond, schedule, guidance_scale, slg, extra, vae_params, *, cfg):
        z = sample(forward, params, latents, cond, schedule, guidance_scale=guidance_scale,
                   num_layers=config.num_layers, slg=slg, extra=extra, cfg=cfg, progress=progress)
        if not decode:
            return z

        return vae_decode(vae_config, vae_params, unscale_latents(vae_config, z), dtype=as_dtype(vae_dtype))

    return pure, vae_config.downsample_factor if vae_config is not None else 8


def _runner(config: MMDiTConfig, call: Callable, *, decode: bool, vae_scale_factor: int) -> Callable:
    """The user-facing `run(params, latents, cond, schedule, *, guidance_scale, ...)`: checks the inputs, draws
    x_T from a key if asked, then `call(params, latents, cond, schedule, guidance, slg, extra, vae_params, cfg)`."""
    noise = jax.jit(initial_latents, static_argnums=1)

    def run(params, latents, cond: Conditioning, schedule: Schedule, *, guidance_scale: float,
            slg: SkipLayerGuidance | None = None, extra: Mapping[str, Any] | None = None, key: Array | None = None,
            height: int | None = None, width: int | None = None, vae_params: Any = None) -> Array:
        cfg = bool(guidance_scale > 1)
        if latents is None:
            if key is None or height is None or width is None:
                raise ValueError("pass either latents (B, C, h, w) or key= with the pixel height= and width=.")
            shape = latent_shape(config, _shape(cond.prompt_embeds)[0], height, width, vae_scale_factor)
        else:
            if key is not None:
                raise ValueError("pass latents or key=, not both: the key only draws latents when none are given.")
            shape = _shape(latents)
        if decode and vae_params is None:
            raise ValueError("this sampler decodes (decode=True): pass vae_params=.")
        check_sample_inputs(jax.ShapeDtypeStruct(shape, jnp.float32), cond, schedule, cfg=cfg,
                            slg=slg if cfg else None, num_layers=config.num_layers)
        check_inputs(config, jax.ShapeDtypeStruct(shape, jnp.float32), 0.0,
                     jax.ShapeDtypeStruct(_shape(cond.prompt_embeds), jnp.float32),
                     jax.ShapeDtypeStruct(_shape(cond.pooled_prompt_embeds), jnp.float32))
        if slg is not None and not cfg:
            warnings.warn("skip-layer guidance is ignored without classifier-free guidance (guidance_scale <= 1), "
                          "as in diffusers' StableDiffusion3Pipeline.", stacklevel=2)
            slg = None
        if latents is None:
            latents = noise(key, shape)  # same compiled sampler as for given latents
        return call(params, latents, cond, schedule, np.float32(guidance_scale), slg, extra,
                    vae_params if decode else None, cfg)

    run.noise = noise  # jit(initial_latents)(key, shape)
    return run


def make_sampler(
    config: MMDiTConfig,
    options: RunOptions | None = None,
    *,
    forward: Forward | None = None,
    decode: bool = False,
    vae_config: Any = None,
    vae_dtype: Any = jnp.float32,
    progress: Callable[[Any], None] | None = None,
    mesh: Any = None,
    rules: Any = "fsdp",
    extra_axes: Any = None,
) -> Callable:
    """A jit-compiled sampler `run(params, latents, cond, schedule, *, guidance_scale, slg=None, extra=None,
    key=None, height=None, width=None, vae_params=None)`.

    `forward` defaults to `make_forward(config, options)`. Give `latents` (B, C, h, w), or
    `latents=None` with `key` and the pixel `height`, `width` to draw x_T = `jax.random.normal(key, shape)`
    (then fed to the same compiled sampler). Returns z_0 (B, C, h, w) float32; with `decode=True` (needs
    `vae_config`, and `vae_params` per call) the VAE decoder's raw output (B, 3, H, W), about [-1, 1], of
    `unscale_latents(z_0)`. Params, latents, conditioning, schedule, guidance scale, SLG and `extra` are jit
    inputs: only shapes and whether CFG / SLG are on compile anew.

    With a `mesh` the same `run` is jitted with in/out shardings under `jax.set_mesh` (DESIGN section 5): params
    laid out by `rules` from their paths (a nested {"base": ..., "cgb": ...} tree too), latents and conditioning
    split along the batch, the schedule, guidance, SLG and VAE params replicated; `extra_axes` gives the axes of
    `extra` per key (see `sharding.tree_shardings`; default replicated). The default forward gets the activation
    constraints of `rules` (`options.activation_sharding`, unless set); a given `forward` must carry them itself.
    `run.sharded[cfg]` is the `ShardedFunction` (`.shardings(...)`, `.compile(...)`) for CFG off / on.
    """
    if forward is None:
        forward = make_forward(config, shd.on_mesh(options or RunOptions(), mesh, rules))
    pure, factor = _sampler_parts(config, forward=forward, decode=decode, vae_config=vae_config, vae_dtype=vae_dtype,
                                  progress=progress)
    if mesh is not None:
        return _sharded(config, pure, factor, mesh, rules, extra_axes, decode=decode)
    jitted = jax.jit(pure, static_argnames=("cfg",))
    run = _runner(config, lambda *args: jitted(*args[:-1], cfg=args[-1]), decode=decode, vae_scale_factor=factor)
    run.jitted = jitted  # jit(pure)(params, latents, cond, schedule, guidance, slg, extra, vae_params, *, cfg)
    return run


def _cond_axes(shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of a Conditioning leaf: embeddings (B, M, J) -> (batch, length, -), pooled (B, P) -> (batch, -)."""
    return ("batch", "length", None) if len(shape) == 3 else ("batch",) + (None,) * (len(shape) - 1)


def _sharded(config: MMDiTConfig, pure: Callable, factor: int, mesh: Any, rules: Any, extra_axes: Any, *,
             decode: bool) -> Callable:
    """`make_sampler`'s `run` with the sampler `pure` as two `ShardedFunction`s (CFG off / on) on `mesh`."""
    axes = ("params", shd.LATENT_AXES, _cond_axes, shd.REPLICATED, shd.REPLICATED, shd.REPLICATED,
            shd.REPLICATED if extra_axes is None else extra_axes, shd.REPLICATED)
    sharded = {cfg: shd.ShardedFunction(functools.partial(pure, cfg=cfg), mesh, rules, axes, shd.LATENT_AXES)
               for cfg in (False, True)}
    run = _runner(config, lambda *args: sharded[args[-1]](*args[:-1]), decode=decode, vae_scale_factor=factor)
    run.sharded = sharded
    return run
