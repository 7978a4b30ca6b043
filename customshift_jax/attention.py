"""Multi-head attention through one function with a backend switch, optionally returning the log-sum-exp.

The log-sum-exp is what the CustomShift attention distribution shift needs to merge two attentions
(DESIGN section 4, form (a)). Softmax statistics are always computed in float32.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Backend = Literal["xla", "jax", "cudnn"]
BACKENDS = ("xla", "jax", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    backend: Backend = "xla",
    return_lse: bool = False,
):
    """softmax(q k^T / sqrt(D) + bias) v over heads.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D); bias broadcastable to (B, H, Nq, Nk) (additive, float32).
    Returns out (B, Nq, H, D) in q's dtype, and with `return_lse` also lse (B, H, Nq) in float32.
    "xla" is an explicit einsum-softmax-einsum (returns the LSE); "jax" and "cudnn" call
    `jax.nn.dot_product_attention` (no LSE: use "xla" where the LSE is needed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}.")
    if backend != "xla":
        if return_lse:
            raise ValueError(f"backend {backend!r} does not return the log-sum-exp; use backend='xla'.")
        implementation = "cudnn" if backend == "cudnn" else None
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)

    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, H, Nq)
    probs = jnp.exp(logits - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return (out, lse) if return_lse else out
