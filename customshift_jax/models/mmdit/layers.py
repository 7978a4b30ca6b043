"""Small building blocks of the SD3 MMDiT, named as diffusers names them (norms, AdaLN, FeedForward)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.models.mmdit.lora import LoRAConfig, lora_product

Dtype = Any


def _lora_a_init(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """PEFT's lora_A init (kaiming uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """diffusers' RMSNorm with a learned scale (`weight` in PyTorch, `scale` here); statistics in float32."""

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


class Dense(nn.Module):
    """A Linear layer (`kernel` (in, out), `bias`) computing in `dtype`, plus LoRA when targeted.

    LoRA factors come from the "lora" collection at this module's path: present -> y += s (x A) B.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_config: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        lora_config = self.lora_config
        if lora_config is not None and lora_config.targets_path(self.path) and (
                self.is_initializing() or self.has_variable("lora", "lora_A")):
            a = self.variable("lora", "lora_A", lambda: _lora_a_init(
                self.make_rng("params"), (x.shape[-1], lora_config.rank), self.param_dtype)).value
            b = self.variable("lora", "lora_B", lambda: jnp.zeros((lora_config.rank, self.features),
                                                                  self.param_dtype)).value
            y = y + lora_product(x.astype(self.dtype), a.astype(self.dtype), b.astype(self.dtype), lora_config.scale)
        return y


class AdaLayerNormZero(nn.Module):
    """Shift/scale/gate modulation from the conditioning vector: `linear(silu(emb))` chunked in `chunks`."""

    chunks: int = 6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> list[jax.Array]:
        dim = emb.shape[-1]
        mod = Dense(self.chunks * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        return jnp.split(mod[:, None, :], self.chunks, axis=-1)  # each (B, 1, D)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm then `x * (1 + scale) + shift`, with (scale, shift) from `linear(silu(emb))` (this order)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        mod = Dense(2 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        scale, shift = jnp.split(mod[:, None, :], 2, axis=-1)
        return layer_norm(x) * (1 + scale) + shift


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class GELUProj(nn.Module):
    """diffusers' GELU(approximate="tanh") module: a projection `proj` then tanh-GELU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_config: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        proj = Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, lora_config=self.lora_config,
                     name="proj")
        return nn.gelu(proj(x), approximate=True)


class FeedForwardNet(nn.Module):
    """The `net` list of diffusers' FeedForward: `0` (GELU projection), `2` (output Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_config: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_config=self.lora_config)
        h = GELUProj(self.dim * self.mult, name="0", **kw)(x)
        return Dense(self.dim, name="2", **kw)(h)


class FeedForward(nn.Module):
    """diffusers' FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate"): params under `net`."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_config: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return FeedForwardNet(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, lora_config=self.lora_config,
                              name="net")(x)
