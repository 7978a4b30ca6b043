"""The joint-attention processor: what the MMDiT's joint attention does with its q, k, v. Injected through
`RunOptions.processor`, as diffusers injects attention processors; a variant (CustomShift's in
`customshift_jax.customshift.cads`) is another processor, and the model imports none of them."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from customshift_jax.models.mmdit.attention import attention


class JointAttnProcessor(Protocol):
    """`processor(attn, q, k, v, n_img=..., per_layer=..., shared=...) -> out (B, Nq, H, D)`.

    attn: the calling `Attention` module (its `heads`, `options`; a processor may keep variables on it, e.g. in
    the "lora" collection); q: (B, Nq, H, D), image queries first (n_img of them); k, v: (B, Nk, H, D) of
    [x; c]; per_layer: this layer's slice of the forward's `processor_per_layer` (None when not given);
    shared: the forward's `processor_shared`, the same in every layer. Must be hashable (a frozen dataclass)."""

    def __call__(self, attn: Any, q: jax.Array, k: jax.Array, v: jax.Array, *, n_img: int, per_layer: Any,
                 shared: Any) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class PlainAttnProcessor:
    """SD3's joint attention (diffusers' `JointAttnProcessor2_0`): softmax attention over [x; c]."""

    def __call__(self, attn, q, k, v, *, n_img, per_layer, shared):
        return attention(q, k, v, backend=attn.options.backend, kernel_layout=attn.options.kernel_layout)
