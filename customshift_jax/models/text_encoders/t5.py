"""transformers' `T5EncoderModel` (T5 v1.1, SD3's T5-XXL) in Flax Linen.

Bidirectional self-attention without scaling, the relative-position bias of block 0 shared by every block, RMS
norms in fp32, gated-GELU feed-forward (tanh GELU). Parameter names follow transformers' modules
(`encoder/block/layer_0/SelfAttention/q/kernel`, ...) with the blocks as one `nn.scan` (a leading layers axis);
block 0's `relative_attention_bias` sits outside the scan as `encoder/relative_attention_bias`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.models.text_encoders.layers import (
    ACTIVATIONS,
    EncoderModule,
    EncoderModuleWithSharding,
    T5LayerNorm,
    attention,
    constrain,
    dense,
)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(T, T) bucket of memory position - query position, bidirectional, in T5's fp32 arithmetic (host side)."""
    pos = np.arange(length, dtype=np.int64)
    relative = pos[None, :] - pos[:, None]  # (query, memory)
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64), half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(EncoderModule):
    """q, k, v, o without biases; no 1/sqrt(d) scaling (folded into T5's initialisation); additive position bias."""

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        c = self.config
        split = lambda y: y.reshape(*y.shape[:2], c.num_heads, c.d_kv)
        q, k, v = (split(dense(c.inner_dim, n, self.dtype, bias=False)(x)) for n in ("q", "k", "v"))
        return dense(c.d_model, "o", self.dtype, bias=False)(attention(q, k, v, scale=1.0, bias=position_bias))


class T5LayerSelfAttention(EncoderModule):
    """layer_norm, SelfAttention, residual."""

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5Attention(self.config, self.dtype, name="SelfAttention")(h, position_bias).astype(jnp.float32)


class T5DenseGatedActDense(EncoderModule):
    """wo(gelu_new(wi_0 x) * wi_1 x), the gate in fp32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = ACTIVATIONS["gelu_new"](dense(c.d_ff, "wi_0", self.dtype, bias=False)(x).astype(jnp.float32))
        h = (gate * dense(c.d_ff, "wi_1", self.dtype, bias=False)(x).astype(jnp.float32)).astype(self.dtype)
        return dense(c.d_model, "wo", self.dtype, bias=False)(h)  # (B, T, D)


class T5LayerFF(EncoderModule):
    """layer_norm, DenseReluDense, residual."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5DenseGatedActDense(self.config, self.dtype, name="DenseReluDense")(h).astype(jnp.float32)


class T5Block(EncoderModuleWithSharding):
    """transformers' `T5Block` (encoder): `layer` = [self-attention, feed-forward]; a scan body over x (B, T, D)."""

    def setup(self) -> None:
        self.layer = [T5LayerSelfAttention(self.config, self.dtype), T5LayerFF(self.config, self.dtype)]

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> tuple[jax.Array, None]:
        x = self.layer[1](self.layer[0](x, position_bias))
        return constrain(self.activation_sharding, x), None


class T5Stack(EncoderModuleWithSharding):
    """transformers' encoder `T5Stack`: the scanned `block`, the shared position bias and `final_layer_norm`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        buckets = relative_position_buckets(x.shape[1], c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, param_dtype=jnp.float32,
                         name="relative_attention_bias")
        position_bias = jnp.transpose(table(jnp.asarray(buckets)).astype(jnp.float32), (2, 0, 1))[None]  # (1,H,T,T)
        blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=c.num_layers)
        x, _ = blocks(c, self.dtype, self.activation_sharding, name="block")(x, position_bias)
        return T5LayerNorm(c.layer_norm_epsilon, jnp.float32, name="final_layer_norm")(x)


class T5EncoderModel(EncoderModuleWithSharding):
    """`shared` token embedding then the encoder; input_ids (B, T) -> last_hidden_state (B, T, d_model) fp32.

    As SD3 calls it: no attention mask (padding tokens are attended to).
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, param_dtype=jnp.float32, name="shared")(input_ids).astype(jnp.float32)
        x = constrain(self.activation_sharding, x)
        return T5Stack(c, self.dtype, self.activation_sharding, name="encoder")(x)
