"""transformers' `CLIPTextModelWithProjection` in Flax Linen (CLIP-L and OpenCLIP bigG as SD3 uses them).

Parameter names follow transformers' modules (`text_model/encoder/layers/self_attn/q_proj/kernel`, ...); the
encoder layers are one `nn.scan` (a leading layers axis), so compile time does not grow with depth. The residual
stream is fp32; matmuls run in `dtype`, layer norms and the softmax in fp32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.models.text_encoders.layers import (
    ACTIVATIONS,
    EncoderModule,
    EncoderModuleWithSharding,
    LayerNorm32,
    attention,
    constrain,
    dense,
)


class CLIPAttention(EncoderModule):
    """Causal multi-head self-attention with biases (q_proj, k_proj, v_proj, out_proj)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        split = lambda y: y.reshape(*y.shape[:2], c.num_attention_heads, c.head_dim)
        q, k, v = (split(dense(c.hidden_size, n, self.dtype)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, scale=c.head_dim ** -0.5, causal=True)  # (B, T, D)
        return dense(c.hidden_size, "out_proj", self.dtype)(out)


class CLIPMLP(EncoderModule):
    """fc1, the config's activation (in fp32), fc2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = dense(c.intermediate_size, "fc1", self.dtype)(x)
        h = ACTIVATIONS[c.hidden_act](h.astype(jnp.float32)).astype(self.dtype)
        return dense(c.hidden_size, "fc2", self.dtype)(h)


class CLIPEncoderLayer(EncoderModuleWithSharding):
    """Pre-LN block; written as a scan body: carry x (B, T, D) fp32, output the layer's hidden state."""

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_eps
        h = LayerNorm32(eps, self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h).astype(jnp.float32)
        h = LayerNorm32(eps, self.dtype, name="layer_norm2")(x)
        x = x + CLIPMLP(self.config, self.dtype, name="mlp")(h).astype(jnp.float32)
        x = constrain(self.activation_sharding, x)
        return x, x


class CLIPTextEmbeddings(EncoderModule):
    """token_embedding + position_embedding (positions 0..T-1), in fp32."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"CLIP input has {input_ids.shape[-1]} tokens; the model has "
                             f"{c.max_position_embeddings} positions")
        tok = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=jnp.float32, name="token_embedding")
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, param_dtype=jnp.float32, name="position_embedding")
        positions = jnp.arange(input_ids.shape[-1])
        return tok(input_ids).astype(jnp.float32) + pos(positions)[None].astype(jnp.float32)  # (B, T, D)


class CLIPEncoder(EncoderModuleWithSharding):
    """transformers' `CLIPEncoder`: the scanned `layers`; returns the last output and every layer's (L, B, T, D)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        layers = nn.scan(CLIPEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.config.num_hidden_layers)
        return layers(self.config, self.dtype, self.activation_sharding, name="layers")(x, None)


class CLIPTextTransformer(EncoderModuleWithSharding):
    """Embeddings, the encoder, the final layer norm and the EOS-token pooling of transformers."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        c = self.config
        x = constrain(self.activation_sharding, CLIPTextEmbeddings(c, name="embeddings")(input_ids))
        last, per_layer = CLIPEncoder(c, self.dtype, self.activation_sharding, name="encoder")(x)
        hidden_states = jnp.concatenate([x[None], per_layer], axis=0)  # (L + 1, B, T, D), as output_hidden_states
        last = LayerNorm32(c.layer_norm_eps, jnp.float32, name="final_layer_norm")(last)
        if c.eos_token_id == 2:  # configs from before transformers PR #24773: the highest id is the EOS token
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first occurrence of eos_token_id (padding may be the EOS token too)
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]  # (B, D)
        return {"hidden_states": hidden_states, "last_hidden_state": last, "pooler_output": pooled}


class CLIPTextModelWithProjection(EncoderModuleWithSharding):
    """`text_model` plus `text_projection` (no bias) of the pooled output: SD3's pooled CLIP embedding.

    Returns {"hidden_states" (L + 1, B, T, D): the embeddings then each layer's output (before the final norm),
    "last_hidden_state" (B, T, D), "pooler_output" (B, D), "text_embeds" (B, P)}, all fp32.
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> dict[str, jax.Array]:
        out = CLIPTextTransformer(self.config, self.dtype, self.activation_sharding, name="text_model")(input_ids)
        proj = dense(self.config.projection_dim, "text_projection", self.dtype, bias=False)
        return {**out, "text_embeds": proj(out["pooler_output"].astype(self.dtype)).astype(jnp.float32)}
