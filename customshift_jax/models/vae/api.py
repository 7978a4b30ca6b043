"""Pure functions over the SD3 VAE: init, encode, decode (NCHW like diffusers), latent scaling (loading: `customshift_jax.io.loading`).

Each takes the `VAEConfig` first and a plain params pytree; jit them with the config static, e.g.
`jax.jit(vae_decode, static_argnums=0)`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.mapping import Params
from customshift_jax.models.vae.model import AutoencoderKL, param_shapes

Array = jax.Array


def _check_nchw(x: Array, channels: int, what: str) -> None:
    if getattr(x, "ndim", None) != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} has shape {getattr(x, 'shape', None)}; expected (B, {channels}, H, W) (NCHW)")


def init_vae(config: VAEConfig, rng: Array, *, param_dtype: Any = jnp.float32) -> Params:
    """Fresh VAE params {'encoder': ..., 'decoder': ...}: kernels N(0, 1 / fan_in), biases 0, norm scales 1.

    All kernels come from one `jax.random.normal` draw, sliced on the host: flax's `model.init` compiles a
    forward and one RNG per parameter, tens of seconds on CPU, for weights that are nearly always loaded."""
    shapes = param_shapes(config)
    total = sum(math.prod(s) for p, s in shapes.items() if p[-1] == "kernel")
    flat = np.asarray(jax.jit(lambda key: jax.random.normal(key, (total,), jnp.float32))(rng))
    params: Params = {}
    offset = 0
    for path, shape in shapes.items():
        if path[-1] == "kernel":  # conv (kh, kw, I, O) or dense (in, out): fan_in = prod(shape[:-1])
            n = math.prod(shape)
            leaf = flat[offset:offset + n].reshape(shape) * np.float32(1.0 / math.sqrt(math.prod(shape[:-1])))
            offset += n
        else:
            leaf = (np.ones if path[-1] == "scale" else np.zeros)(shape, np.float32)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(leaf, dtype=param_dtype)
    return params


def vae_encode_moments(config: VAEConfig, params: Params, images: Array, *,
                       dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/f, W/f); logvar clamped to
    [-30, 20] like diffusers' DiagonalGaussianDistribution."""
    _check_nchw(images, config.in_channels, "images")
    x = jnp.transpose(jnp.asarray(images), (0, 2, 3, 1))  # (B, H, W, C)
    mean, logvar = AutoencoderKL(config, dtype=dtype).apply({"params": params}, x,
                                                            method=AutoencoderKL.encode_moments)
    return jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(logvar, (0, 3, 1, 2))


def vae_encode(config: VAEConfig, params: Params, images: Array, *, sample_key: Array | None = None,
               dtype: Any = jnp.float32) -> Array:
    """images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, latent_channels, H/f, W/f): the posterior mean,
    or with `sample_key` a sample mean + exp(logvar / 2) * N(0, 1). Apply `scale_latents` before the MMDiT."""
    mean, logvar = vae_encode_moments(config, params, images, dtype=dtype)
    if sample_key is None:
        return mean
    # Flat draw then reshape: the same numbers as a 4-D draw (threefry counts in row-major order), but XLA:CPU
    # compiles the 4-D form of the partitionable threefry for tens of seconds.
    noise = jax.random.normal(sample_key, (mean.size,), mean.dtype).reshape(mean.shape)
    return mean + jnp.exp(0.5 * logvar) * noise


def vae_decode(config: VAEConfig, params: Params, latents: Array, *, dtype: Any = jnp.float32) -> Array:
    """unscaled latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f), the raw decoder output
    (about [-1, 1]; no clipping). Apply `unscale_latents` to MMDiT latents first."""
    _check_nchw(latents, config.latent_channels, "latents")
    z = jnp.transpose(jnp.asarray(latents), (0, 2, 3, 1))  # (B, h, w, C)
    out = AutoencoderKL(config, dtype=dtype).apply({"params": params}, z, method=AutoencoderKL.decode)
    return jnp.transpose(out, (0, 3, 1, 2))


def scale_latents(config: VAEConfig, z: Array) -> Array:
    """VAE latents -> MMDiT latents: (z - shift_factor) * scaling_factor, as SD3's training and pipeline do."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: VAEConfig, z: Array) -> Array:
    """MMDiT latents -> VAE latents: z / scaling_factor + shift_factor (SD3 pipeline before `vae.decode`)."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)
