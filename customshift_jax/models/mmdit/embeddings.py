"""Input embeddings of the SD3 MMDiT: patches + cropped 2-D sin-cos positions, timestep + pooled text."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.models.mmdit.layers import Dense, Dtype


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a square grid: (grid_size**2, embed_dim) float32.

    The table is stored in checkpoints (`pos_embed.pos_embed`); this builds it for random init.
    """
    coords = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size)
    grid_w, grid_h = np.meshgrid(coords, coords, indexing="xy")  # first output varies along columns

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # diffusers stacks (w, h) and embeds grid[0] (w coordinates) first.
    emb = np.concatenate([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1)
    return emb.astype(np.float32)


class PatchConv(nn.Module):
    """diffusers' stride-p p x p `Conv2d`, as a matmul over non-overlapping patches: (B, C, H, W) -> (B, N, D)."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        b, c, h, w = latents.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        patches = latents.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
        patches = patches.reshape(b, gh * gw, p * p * c).astype(self.dtype)
        flat_kernel = kernel.reshape(p * p * c, self.features).astype(self.dtype)
        return jnp.dot(patches, flat_kernel) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """Conv patchify `proj` plus the centre crop of the `pos_embed` table (diffusers' SD3 cropping)."""

    embed_dim: int
    patch_size: int
    pos_embed_max_size: int
    base_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        h, w = latents.shape[-2:]  # latents: (B, C, H, W) as in diffusers
        p, m = self.patch_size, self.pos_embed_max_size
        gh, gw = h // p, w // p
        if gh > m or gw > m:
            raise ValueError(f"latent grid {gh}x{gw} exceeds pos_embed_max_size {m}.")
        x = PatchConv(self.embed_dim, p, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(latents)

        table = self.param("pos_embed", lambda _, shape: jnp.asarray(
            sincos_pos_embed_2d(self.embed_dim, m, self.base_size))[None], (1, m * m, self.embed_dim))
        top, left = (m - gh) // 2, (m - gw) // 2
        pos = table.reshape(m, m, self.embed_dim)[top:top + gh, left:left + gw].reshape(1, gh * gw, self.embed_dim)
        return (x.astype(jnp.float32) + pos.astype(jnp.float32)).astype(self.dtype)  # (B, N, D)


def timestep_frequencies(dim: int = 256) -> np.ndarray:
    """exp(-ln(10000) k / (dim/2)), k < dim/2, as a correctly rounded float32 constant.

    The exponent is formed in float32 as diffusers does; exp is taken in float64 and rounded once, so the
    table does not depend on a backend's float32 exp (one ulp there moves sin(999 f) by 1e-4).
    """
    half = dim // 2
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_sinusoid(timesteps: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: (B,) -> (B, dim) float32."""
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(timestep_frequencies(dim))[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TwoLayerMLP(nn.Module):
    """`linear_1`, SiLU, `linear_2`: diffusers' TimestepEmbedding and PixArtAlphaTextProjection (silu)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return Dense(self.features, name="linear_2", **kw)(nn.silu(Dense(self.features, name="linear_1", **kw)(x)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = timestep_embedder(sinusoid(t)) + text_embedder(pooled): the AdaLN conditioning vector."""

    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = TwoLayerMLP(self.embed_dim, name="timestep_embedder", **kw)(timestep_sinusoid(timestep).astype(self.dtype))
        return t + TwoLayerMLP(self.embed_dim, name="text_embedder", **kw)(pooled.astype(self.dtype))  # (B, D)
