"""The metrics' image towers in JAX: DINO's ViTModel (CLS token) and CLIP's vision tower with its projection.

Pure functions of the transformers state dict (parameter names as transformers 5 writes them), fp32 with
the highest matmul precision: `customshift eval` runs them (faster than PyTorch here, bench/eval_encoders.py),
and they equal transformers' own forward to ~1e-6 (tests/eval/test_eval_metrics.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
ACTIVATIONS: dict[str, Callable] = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
                                    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


def _ln(p: Mapping[str, Any], name: str, h: jax.Array, eps: float) -> jax.Array:
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _dense(p: Mapping[str, Any], name: str, h: jax.Array) -> jax.Array:
    out = jnp.matmul(h, p[f"{name}.weight"].T, precision=HIGHEST)
    return out + p[f"{name}.bias"] if f"{name}.bias" in p else out


def _patches(w: jax.Array, x: jax.Array) -> jax.Array:
    """The patch embedding conv (stride = kernel) as one matmul: (B, 3, H, W) -> (B, N, D), no bias."""
    b, c, size, patch = x.shape[0], x.shape[1], x.shape[-1], w.shape[-1]
    g = size // patch
    tiles = x.reshape(b, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    return jnp.matmul(tiles, w.reshape(w.shape[0], -1).T, precision=HIGHEST)


def _block(p: Mapping[str, Any], names: Mapping[str, str], h: jax.Array, heads: int, eps: float,
           act: Callable) -> jax.Array:
    """One pre-LN encoder layer: h + attn(LN(h)), then + MLP(LN(h)). h: (B, N, D)."""
    b, n, d = h.shape
    y = _ln(p, names["ln1"], h, eps)
    q, k, v = (_dense(p, names[t], y).reshape(b, n, heads, d // heads) for t in "qkv")  # (B, N, H, Dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(d // heads)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=HIGHEST)
    h = h + _dense(p, names["o"], att.reshape(b, n, d))
    return h + _dense(p, names["fc2"], act(_dense(p, names["fc1"], _ln(p, names["ln2"], h, eps))))


def _layers(p: Mapping[str, Any], prefix: str) -> list[int]:
    depth = len(prefix.split("."))
    return sorted({int(k.split(".")[depth]) for k in p if k.startswith(prefix + ".")})


def vit_cls(p: Mapping[str, Any], x: jax.Array, *, heads: int, eps: float, act: str = "gelu") -> jax.Array:
    """transformers' ViTModel: (B, 3, H, W) -> (B, D), the CLS token of last_hidden_state (after the final LN)."""
    h = _patches(p["embeddings.patch_embeddings.projection.weight"], x) + p[
        "embeddings.patch_embeddings.projection.bias"]
    cls = jnp.broadcast_to(p["embeddings.cls_token"], (x.shape[0], 1, h.shape[-1]))
    h = jnp.concatenate([cls, h], axis=1) + p["embeddings.position_embeddings"]
    for i in _layers(p, "layers"):
        pre = f"layers.{i}"
        names = {"ln1": f"{pre}.layernorm_before", "ln2": f"{pre}.layernorm_after", "o": f"{pre}.attention.o_proj",
                 "fc1": f"{pre}.mlp.fc1", "fc2": f"{pre}.mlp.fc2",
                 **{t: f"{pre}.attention.{t}_proj" for t in "qkv"}}
        h = _block(p, names, h, heads, eps, ACTIVATIONS[act])
    return _ln(p, "layernorm", h, eps)[:, 0]


def clip_image_features(p: Mapping[str, Any], x: jax.Array, *, heads: int, eps: float,
                        act: str = "quick_gelu") -> jax.Array:
    """CLIPModel.get_image_features: (B, 3, H, W) -> (B, P), the projected, post-LN CLS token."""
    v = "vision_model"
    h = _patches(p[f"{v}.embeddings.patch_embedding.weight"], x)
    cls = jnp.broadcast_to(p[f"{v}.embeddings.class_embedding"], (x.shape[0], 1, h.shape[-1]))
    h = jnp.concatenate([cls, h], axis=1) + p[f"{v}.embeddings.position_embedding.weight"]
    h = _ln(p, f"{v}.pre_layrnorm", h, eps)
    for i in _layers(p, f"{v}.encoder.layers"):
        pre = f"{v}.encoder.layers.{i}"
        names = {"ln1": f"{pre}.layer_norm1", "ln2": f"{pre}.layer_norm2", "o": f"{pre}.self_attn.out_proj",
                 "fc1": f"{pre}.mlp.fc1", "fc2": f"{pre}.mlp.fc2",
                 **{t: f"{pre}.self_attn.{t}_proj" for t in "qkv"}}
        h = _block(p, names, h, heads, eps, ACTIVATIONS[act])
    return _dense(p, "visual_projection", _ln(p, f"{v}.post_layernorm", h[:, 0], eps))


def jax_params(state_dict: Mapping[str, Any], keep: Callable[[str], bool] = lambda k: True) -> dict[str, jax.Array]:
    """A torch state dict (the tensors kept by `keep`) as float32 JAX arrays under the same names."""
    return {k: jnp.asarray(v.detach().float().numpy()) for k, v in state_dict.items() if keep(k)}
