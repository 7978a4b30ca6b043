"""The inference rows of the CPU benchmarks, each as a `Case`: a JAX and a torch closure on the same weights and
inputs (JAX compiled ahead, its compile time apart). Training rows: bench/_train_cases.py."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from _common import MMDiTPair, sd3_pipeline
from customshift_jax.numerics import relative_error


@dataclasses.dataclass
class Case:
    """One row: both sides as closures, the JAX compile seconds, a shape note, how to compare the two sides'
    first outputs (default: the relative error of two arrays), what to undo after, and the compiled JAX program
    with its arguments (what `bench/profile_cpu.py` traces and labels op by op)."""

    run_jax: Callable[[], Any]
    run_torch: Callable[[], Any]
    compile_s: float
    shape: str = ""
    errors: Callable[[Any, Any], str] = lambda ours, theirs: f"{relative_error(ours, theirs):.1e}"
    close: Callable[[], None] = lambda: None
    compiled: Any = None
    jax_args: tuple = ()


def _compile(fn, *args, **static):
    """(AOT-compiled `fn` on `args`, seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - t0


def forward_case(pair: MMDiTPair, *, batch: int, size: int, text_len: int, dtype: str = "float32",
                 backend: str = "xla") -> Case:
    """One MMDiT forward (B, C, size, size) with `text_len` prompt tokens: make_forward vs diffusers."""
    import jax
    import numpy as np
    import torch

    from customshift_jax import RunOptions, make_forward
    from customshift_jax.crosscheck.mmdit import ForwardInputs
    from customshift_jax.models.mmdit.api import skip_mask

    config = pair.config
    inputs = ForwardInputs.random(config, batch=batch, height=size, width=size, text_len=text_len)
    fwd = jax.jit(make_forward(config, RunOptions(dtype=dtype, backend=backend)))
    args = (pair.params, inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states,
            inputs.pooled_projections, skip_mask(config, None))
    compiled, compile_s = _compile(fwd, *args)
    torch_in = inputs.torch(dtype)

    def run_jax():
        return np.asarray(jax.block_until_ready(compiled(*args)), np.float32)

    def run_torch():
        with torch.no_grad():
            return pair.model(**torch_in).sample.float().numpy()

    return Case(run_jax, run_torch, compile_s, f"B{batch} {size * 8}px text {text_len}", compiled=compiled,
                jax_args=args)


def sampling_case(pair: MMDiTPair, *, batch: int, size: int, text_len: int, steps: int,
                  guidance: float) -> Case:
    """Both samplers, latents out (B, C, size, size) float32; CFG when `guidance` > 1 (2B per model call)."""
    import jax
    import numpy as np
    import torch

    from customshift_jax.sampling import Conditioning, make_sampler, make_schedule

    config = pair.config
    pipe = sd3_pipeline(pair.model)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, config.in_channels, size, size)).astype(np.float32)
    embeds = [rng.standard_normal(s).astype(np.float32) for s in
              [(batch, text_len, config.joint_attention_dim), (batch, config.pooled_projection_dim)] * 2]
    cfg = guidance > 1
    cond = Conditioning(*embeds) if cfg else Conditioning(*embeds[:2])
    schedule = make_schedule(dict(pipe.scheduler.config), steps)
    jax_args = (pair.params, latents, cond, schedule, np.float32(guidance), None, None, None)
    compiled, compile_s = _compile(make_sampler(config).jitted, *jax_args, cfg=cfg)
    t = torch.from_numpy
    neg = dict(negative_prompt_embeds=t(embeds[2]), negative_pooled_prompt_embeds=t(embeds[3])) if cfg else {}
    px = size * pipe.vae_scale_factor  # only checked for divisibility: the latents are given

    def run_jax():
        return np.asarray(jax.block_until_ready(compiled(*jax_args)))

    def run_torch():
        with torch.no_grad():
            return pipe(height=px, width=px, num_inference_steps=steps, guidance_scale=guidance,
                        latents=t(latents), prompt_embeds=t(embeds[0]), pooled_prompt_embeds=t(embeds[1]),
                        output_type="latent", **neg).images.float().numpy()

    note = f"CFG {guidance:g}" if cfg else "no CFG"
    return Case(run_jax, run_torch, compile_s, f"B{batch} {size * 8}px text {text_len}, {steps} steps {note}",
                compiled=compiled, jax_args=jax_args)


def vae_case(kind: str, *, batch: int, size: int) -> Case:
    """SD3 VAE (random weights) `kind` "encode" (images (B, 3, 8 size, 8 size) -> posterior mean) or "decode"
    (latents (B, 16, size, size) -> images): ours vs diffusers' AutoencoderKL."""
    import diffusers
    import jax
    import numpy as np
    import torch

    from customshift_jax.models.vae import VAEConfig, vae_decode, vae_encode, vae_params_from_state_dict

    config = VAEConfig.sd3()
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**config.to_diffusers_config()).eval()
    params = vae_params_from_state_dict(config, model.state_dict())
    if kind == "decode":
        x = torch.randn(batch, config.latent_channels, size, size)
        fn, torch_fn = vae_decode, lambda: model.decode(x).sample
    elif kind == "encode":
        px = size * config.downsample_factor
        x = torch.rand(batch, config.in_channels, px, px) * 2 - 1
        fn, torch_fn = vae_encode, lambda: model.encode(x).latent_dist.mean
    else:
        raise ValueError(f"vae_case kind {kind!r}: expected 'encode' or 'decode'.")
    compiled, compile_s = _compile(jax.jit(fn, static_argnums=0), config, params, x.numpy())

    def run_jax():
        return np.asarray(jax.block_until_ready(compiled(params, x.numpy())))

    def run_torch():
        with torch.no_grad():
            return torch_fn().numpy()

    return Case(run_jax, run_torch, compile_s, f"B{batch} {size * config.downsample_factor}px", compiled=compiled,
                jax_args=(params, x.numpy()))
