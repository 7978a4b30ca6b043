"""Conditional Attention Distribution Shift (DESIGN section 4): image queries also read the reference K/V.

For an image query i and head h, with base keys B = [x; c] and reference keys R = [r; s]:
    alpha_i = sigmoid(LSE_R(i) - LSE_B(i) + lambda_h),  lambda_h = beta_h + log(gamma)
    out_i   = (1 - alpha_i) o_B(i) + alpha_i o_R(i)
Text queries attend over B only (shift "cads" and "concat", lambda = 0, the token-competition baseline); shift
"joint" is the OminiControl-style baseline: the reference tokens join the sequence, every query (text too) reads
them, lambda = 0. Two equal forms: (a) two attentions returning the LSE, then the merge;
(b) one attention over [B; R] with lambda added on the R columns and the text rows masked from R; on backend
"flash" form (b) is one fused Pallas kernel (`customshift_jax.kernels.shifted_flash_attention`), no dense bias.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from customshift_jax.customshift.axes import BETA
from customshift_jax.kernels import shifted_flash_attention
from customshift_jax.models.mmdit.attention import attention

Shift = Literal["cads", "concat", "joint"]
Form = Literal["two_pass", "single"]
SHIFTS = ("cads", "concat", "joint")
GAMMA_FREE = ("concat", "joint")  # the baselines: lambda = 0, so gamma (and reference dropout through it) does nothing
FORMS = ("two_pass", "single")


def shift_logit(beta: jax.Array, gamma: jax.Array, shift: Shift = "cads") -> jax.Array:
    """lambda float32: beta + log(gamma) for "cads"; 0 for "concat" and "joint" (the concatenation baselines).

    beta (H,); gamma a scalar (lambda (H,)) or one per sample (B,) (lambda (B, H)). gamma = 0 gives
    lambda = -inf: the reference path carries no mass and the output is the base one.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {SHIFTS}.")
    beta = beta.astype(jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.ndim > 1:
        raise ValueError(f"gamma must be a scalar or one value per sample (B,), got shape {gamma.shape}.")
    if shift in GAMMA_FREE:
        return jnp.zeros(gamma.shape + beta.shape, jnp.float32)
    return beta + jnp.log(gamma)[..., None]  # (H,) for a scalar gamma, (B, H) for one per sample


def _per_batch_head(lam: jax.Array) -> jax.Array:
    """lambda (H,) or (B, H) -> broadcastable (1 or B, H, 1, 1) against (B, H, Nq, Nk)."""
    return lam[None, :, None, None] if lam.ndim == 1 else lam[:, :, None, None]


def merge_with_reference(o_base, lse_base, o_ref, lse_ref, lam):
    """(1 - alpha) o_B + alpha o_R with alpha = sigmoid(LSE_R - LSE_B + lambda), in float32.

    o_*: (B, N, H, D); lse_*: (B, H, N); lam: (H,) or (B, H). Returns (B, N, H, D) in o_base's dtype.
    """
    alpha = jax.nn.sigmoid(lse_ref - lse_base + _per_batch_head(lam)[..., 0])  # (B, H, N)
    alpha = jnp.swapaxes(alpha, 1, 2)[..., None]  # (B, N, H, 1)
    merged = (1 - alpha) * o_base.astype(jnp.float32) + alpha * o_ref.astype(jnp.float32)
    return merged.astype(o_base.dtype)


def single_form_bias(lam: jax.Array, n_img: int, nq: int, nk: int, nr: int) -> jax.Array:
    """Form (b)'s dense bias (1 or B, H, Nq, Nk + R) float32: 0 on the base columns, lambda on the reference
    columns of the first `n_img` queries, -inf there for the text queries."""
    is_img = (jnp.arange(nq) < n_img)[None, None, :, None]  # (1, 1, Nq, 1)
    ref_bias = jnp.where(is_img, _per_batch_head(lam), -jnp.inf)  # (1 or B, H, Nq, 1)
    lead = ref_bias.shape[:2]
    return jnp.concatenate([jnp.zeros(lead + (nq, nk), jnp.float32),
                            jnp.broadcast_to(ref_bias, lead + (nq, nr))], axis=-1)


def _repeat_to(ref: jax.Array, b: int) -> jax.Array:
    """(B', ...) -> (b, ...): broadcast one reference, or repeat B' references b / B' times along the batch."""
    if ref.shape[0] == 1 or ref.shape[0] == b:
        return jnp.broadcast_to(ref, (b,) + ref.shape[1:])
    if b % ref.shape[0]:
        raise ValueError(f"{ref.shape[0]} references do not divide a batch of {b} queries; give one reference, or "
                         "one per sample.")
    return jnp.tile(ref, (b // ref.shape[0],) + (1,) * (ref.ndim - 1))


def cads_attention(q, k, v, k_ref, v_ref, lam, n_img: int, *, form: Form = "two_pass", backend: str = "xla",
                   kernel_layout: tuple[tuple[str, ...], tuple[str, ...]] | None = None):
    """Joint attention in which the first `n_img` queries also read (k_ref, v_ref) through the shift.

    q: (B, Nq, H, D) with image queries first; k, v: (B, Nk, H, D) base keys [x; c];
    k_ref, v_ref: (B', R, H, D) with B' dividing B: one reference for all, one per sample, or one per sample of a
    batch that repeats its samples (CFG's [uncond; text]: sample i of every repeat reads reference i);
    lam: (H,) or per sample (B, H), float32. Returns (B, Nq, H, D).
    `kernel_layout`: the flash kernels' mesh split (`RunOptions.kernel_layout`).
    """
    k_ref, v_ref = (_repeat_to(x, q.shape[0]).astype(y.dtype) for x, y in ((k_ref, k), (v_ref, v)))
    if form == "two_pass":
        o_base, lse_base = attention(q, k, v, backend=backend, return_lse=True, kernel_layout=kernel_layout)
        o_ref, lse_ref = attention(q[:, :n_img], k_ref, v_ref, backend=backend, return_lse=True,
                                   kernel_layout=kernel_layout)
        img = merge_with_reference(o_base[:, :n_img], lse_base[..., :n_img], o_ref, lse_ref, lam)
        return jnp.concatenate([img, o_base[:, n_img:]], axis=1)
    if form == "single" and backend == "flash":  # the fused kernel: lambda per key block, no dense bias
        return shifted_flash_attention(q, k, v, k_ref, v_ref, lam, n_img, layout=kernel_layout)[0]
    if form == "single":
        bias = single_form_bias(lam, n_img, q.shape[1], k.shape[1], k_ref.shape[1])
        return attention(q, jnp.concatenate([k, k_ref], axis=1), jnp.concatenate([v, v_ref], axis=1),
                         bias=bias, backend=backend)
    raise ValueError(f"unknown CADS form {form!r}; expected one of {FORMS}.")


@dataclasses.dataclass(frozen=True)
class CustomShiftAttnProcessor:
    """The joint-attention processor of both CustomShift branches, injected through `RunOptions.processor`.

    per_layer: this layer's reference (K, V), (B or 1, R, H, D) each, or None (then the base attention: the
    RAB prefill, or the CGB without a reference); shared: gamma, a scalar or (B,) (None: 1). beta (H,), the
    learned shift, lives in the "lora" collection at the attention's path (`.../attn/beta`): created at init
    when `makes_beta` (the CGB's processor, `branches.init_lora`), read whenever the tree carries it, else 0.
    With `RunOptions.backend="flash"`, form "single" is the fused Pallas kernel and "two_pass" two flash calls."""

    shift: Shift = "cads"
    form: Form = "two_pass"
    makes_beta: bool = False

    def __post_init__(self):
        if self.shift not in SHIFTS:
            raise ValueError(f"unknown shift {self.shift!r}; expected one of {SHIFTS}.")
        if self.form not in FORMS:
            raise ValueError(f"unknown CADS form {self.form!r}; expected one of {FORMS}.")

    def beta(self, attn: Any) -> jax.Array:
        """beta (H,) float32 from the calling attention module's "lora" collection; 0 if absent."""
        creating = attn.is_initializing() and self.makes_beta
        if creating or attn.has_variable("lora", BETA):
            return attn.variable("lora", BETA, lambda: jnp.zeros((attn.heads,), jnp.float32)).value
        return jnp.zeros((attn.heads,), jnp.float32)

    def __call__(self, attn, q, k, v, *, n_img, per_layer, shared):
        lam = shift_logit(self.beta(attn), 1.0 if shared is None else shared, self.shift)
        if per_layer is None:
            return attention(q, k, v, backend=attn.options.backend, kernel_layout=attn.options.kernel_layout)
        k_ref, v_ref = per_layer
        readers = q.shape[1] if self.shift == "joint" else n_img  # the queries that read the reference
        return cads_attention(q, k, v, k_ref, v_ref, lam, readers, form=self.form, backend=attn.options.backend,
                              kernel_layout=attn.options.kernel_layout)
