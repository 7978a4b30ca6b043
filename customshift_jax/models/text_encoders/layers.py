"""Pieces shared by the Flax CLIP and T5 encoders: fp32 norms, the attention core with an fp32 softmax, activations.

Compute runs in `dtype` (bf16 or fp32); norms and softmax always in fp32, as transformers does for half precision.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ActivationSharding = Callable[[jax.Array, tuple], jax.Array] | None
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # the tanh approximation (T5 v1.1's gelu_new)
}


class EncoderModule(nn.Module):
    """A piece of an encoder: its config (CLIPTextConfig or T5Config) and the matmuls' dtype."""

    config: Any
    dtype: Any = jnp.float32


class EncoderModuleWithSharding(EncoderModule):
    """A piece that also constrains its output's sharding (the MMDiT's `activation_sharding` hook)."""

    activation_sharding: ActivationSharding = None


def dense(width: int, name: str, dtype: Any, bias: bool = True) -> nn.Dense:
    """A torch.nn.Linear as nn.Dense: fp32 params, matmul in `dtype`."""
    return nn.Dense(width, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def constrain(hook: ActivationSharding, x: jax.Array) -> jax.Array:
    """The sharding hook on a (B, T, D) activation, or x unchanged without a hook."""
    return x if hook is None else hook(x, ("batch", "length", "embed"))


class LayerNorm32(nn.Module):
    """torch.nn.LayerNorm (params `scale`, `bias`) computed in fp32; returns `dtype`."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class T5LayerNorm(nn.Module):
    """T5's RMS norm (param `weight` as `scale`, no bias, no mean): fp32 statistics, returns `dtype`."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias: jax.Array | None = None,
              causal: bool = False) -> jax.Array:
    """softmax(scale q k^T + bias) v with the logits and softmax in fp32. q, k, v (B, T, H, Dh) -> (B, T, H*Dh)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale  # (B, H, T, T)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if causal:
        t = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, T, H, Dh)
    return out.reshape(*out.shape[:2], -1)
