"""Multi-head attention through one function with a backend switch, optionally returning the log-sum-exp.

The log-sum-exp is what the CustomShift attention distribution shift needs to merge two attentions
(DESIGN section 4, form (a)). Softmax statistics are always computed in float32.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from customshift_jax.kernels import flash_attention

Backend = Literal["xla", "blocked", "jax", "cudnn", "flash"]
BACKENDS = ("xla", "blocked", "jax", "cudnn", "flash")
QUERY_BLOCK = 256  # queries per block of the "blocked" backend: (B, H, 256, Nk) logits live at a time


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    backend: Backend = "xla",
    return_lse: bool = False,
    kernel_layout: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
):
    """softmax(q k^T / sqrt(D) + bias) v over heads.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D); bias broadcastable to (B, H, Nq, Nk) (additive, float32).
    Returns out (B, Nq, H, D) in q's dtype, and with `return_lse` also lse (B, H, Nq) in float32.
    "xla" is an explicit einsum-softmax-einsum (returns the LSE); "blocked" is the same math run over
    blocks of queries, so only (B, H, block, Nk) logits exist at a time (exact: softmax is per row);
    "jax" and "cudnn" call `jax.nn.dot_product_attention` (no LSE: use "xla" or "blocked" for it);
    "flash" is the Pallas flash kernel (`customshift_jax.kernels`: LSE, no bias; on cpu it runs in Pallas
    interpret mode, slow, for checking; Triton on GPU, Mosaic on TPU; `kernel_layout`: its mesh split of
    (batch, heads), `RunOptions.kernel_layout`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}.")
    if backend in ("jax", "cudnn"):
        if return_lse:
            raise ValueError(f"backend {backend!r} does not return the log-sum-exp; use 'xla' or 'blocked'.")
        implementation = "cudnn" if backend == "cudnn" else None
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
    if backend == "flash":
        if bias is not None:
            raise ValueError("backend 'flash' takes no dense bias (the CustomShift shift has its own fused kernel: "
                             "`customshift_jax.kernels.shifted_flash_attention`); use 'xla' or 'blocked' for a bias.")
        out, lse = flash_attention(q, k, v, layout=kernel_layout)
        return (out, lse) if return_lse else out
    if backend == "blocked" and q.shape[1] > QUERY_BLOCK:
        out, lse = _query_blocked(q, k, v, bias, QUERY_BLOCK)
        return (out, lse) if return_lse else out
    return _softmax_attention(q, k, v, bias, return_lse)


def _softmax_attention(q, k, v, bias, return_lse: bool):
    """The explicit einsum-softmax-einsum over all queries at once."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, H, Nq)
    probs = jnp.exp(logits - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return (out, lse) if return_lse else out


def _query_blocked(q, k, v, bias, block: int):
    """`_softmax_attention` over blocks of `block` queries in a `lax.map`; pads Nq to a multiple of it."""
    b, n, h, d = q.shape
    nb = -(-n // block)
    pad = nb * block - n
    xs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block, h, d).swapaxes(0, 1)
    per_row_bias = bias is not None and jnp.ndim(bias) >= 2 and jnp.shape(bias)[-2] != 1
    if per_row_bias:  # cut the bias's query axis into the same blocks: (nb, b|1, h|1, block, Nk|1)
        bias = jnp.asarray(bias, jnp.float32)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0)))
        xs = (xs, bias.reshape(*bias.shape[:2], nb, block, bias.shape[3]).transpose(2, 0, 1, 3, 4))

    def one(x):
        q_block, bias_block = x if per_row_bias else (x, bias)
        return _softmax_attention(q_block, k, v, bias_block, True)

    out, lse = jax.lax.map(one, xs)  # (nb, B, block, H, D), (nb, B, H, block)
    out = out.swapaxes(0, 1).reshape(b, nb * block, h, d)[:, :n]  # (B, Nq, H, D)
    lse = lse.transpose(1, 2, 0, 3).reshape(b, h, nb * block)[:, :, :n]  # (B, H, Nq)
    return out, lse
