"""Flash attention (Pallas) with forward and backward, returning the log-sum-exp, and its shifted form: the
CustomShift reference read fused into the same pass (DESIGN section 4, form (b), without the dense bias).

Layout of the public functions is the model's (B, N, H, D); they transpose to (B, H, N, D), pad the lengths to
the blocks (padded keys masked, padded queries dropped) and run the kernels of `pallas_flash`. On cpu the
kernels run in Pallas interpret mode (the reference of what GPU / TPU compile; slow, for tests); on GPU they
lower with Triton, on TPU with Mosaic (also from a CPU host compiling for a TPU topology under `jax.set_mesh`).
Gradients flow to q, k, v, the reference K/V and lambda, also through
the LSE output (the two-pass shift differentiates through it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from customshift_jax.kernels import pallas_flash
from customshift_jax.kernels.blocks import (
    BlockSizes,
    check_supported,
    choose_block_sizes,
    resolve_interpret,
    target_platform,
)
from customshift_jax.kernels.pallas_flash import KernelSpec
from customshift_jax.kernels.partition import Layout


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, ref, spec: KernelSpec):
    """(out, lse) on padded (B, H, N, D) arrays; ref: () or (k_ref, v_ref, row_bias)."""
    return pallas_flash.forward(q, k, v, ref, spec)


def _flash_fwd(q, k, v, ref, spec):
    out, lse = pallas_flash.forward(q, k, v, ref, spec)
    return (out, lse), (q, k, v, ref, out, lse)


def _flash_bwd(spec, residuals, cotangents):
    q, k, v, ref, out, lse = residuals
    d_out, d_lse = cotangents
    # dS = P (dP - delta) with delta = rowsum(dO * O) - dLSE: the LSE's cotangent enters as a row shift
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None] - d_lse  # (B, H, 1, Nq_p)
    dq, d_bias = pallas_flash.backward_dq(q, k, v, ref, d_out, lse, delta, spec)
    dk, dv = pallas_flash.backward_dkv(q, k, v, None, d_out, lse, delta, spec.nk, spec)
    if not spec.nr:
        return dq, dk, dv, ()
    k_ref, v_ref, row_bias = ref
    dk_ref, dv_ref = pallas_flash.backward_dkv(q, k_ref, v_ref, row_bias, d_out, lse, delta, spec.nr, spec)
    return dq, dk, dv, (dk_ref, dv_ref, d_bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_kernel_layout(x: jax.Array, block: int) -> jax.Array:
    """(B, N, H, D) -> (B, H, N_p, D), N_p the next multiple of `block` (zeros past N)."""
    pad = -x.shape[1] % block
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _check_shapes(q, k, v, k_ref=None, v_ref=None):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash attention expects q (B, Nq, H, D) and k, v (B, Nk, H, D) of the same B, H, D; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}.")
    if k_ref is not None and (k_ref.shape != v_ref.shape or k_ref.ndim != 4 or k_ref.shape[0] not in (1, q.shape[0])
                              or k_ref.shape[2:] != q.shape[2:]):
        raise ValueError(f"flash attention expects k_ref, v_ref (B or 1, R, H, D) beside q {q.shape}; got "
                         f"{k_ref.shape}, {v_ref.shape}.")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"flash attention needs floating inputs, got {q.dtype}.")


def _spec(q, nk: int, nr: int, block_sizes: BlockSizes | None, interpret: bool | None,
          platform: str | None, layout: Layout | None) -> KernelSpec:
    platform = target_platform(platform)
    interpret = resolve_interpret(interpret, platform)
    d = q.shape[3]
    bq, bk = choose_block_sizes(q.shape[1], nk, d, platform, block_sizes, nr=nr)
    check_supported(platform, interpret, d, bq, bk, q.dtype)
    return KernelSpec(block_q=bq, block_k=bk, nk=nk, nr=nr, scale=d ** -0.5, interpret=interpret, platform=platform,
                      layout=layout)


def _finish(out, lse, nq: int):
    """Kernel layout back to out (B, Nq, H, D), lse (B, H, Nq)."""
    return out.transpose(0, 2, 1, 3)[:, :nq], lse[:, :, 0, :nq]


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None, platform: str | None = None,
                    layout: Layout | None = None) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(D)) v: out (B, Nq, H, D) in q's dtype and lse (B, H, Nq) float32.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D). interpret None: Pallas interpret mode exactly on cpu. platform: "gpu"
    or "tpu" to lower for; None: the platform of the mesh set by `jax.set_mesh` (so a CPU host compiling for a
    TPU topology's mesh gets Mosaic), else the default backend's. On a mesh of several devices each device runs
    its own samples and heads (`kernels.partition`), split over the mesh axes (batch axes, head axes) of
    `layout` when given (`RunOptions.kernel_layout`), else over axes `partition.layout` chooses.
    """
    _check_shapes(q, k, v)
    spec = _spec(q, k.shape[1], 0, block_sizes, interpret, platform, layout)
    out, lse = _flash(_to_kernel_layout(q, spec.block_q), _to_kernel_layout(k, spec.block_k),
                      _to_kernel_layout(v, spec.block_k), (), spec)
    return _finish(out, lse, q.shape[1])


def shifted_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_ref: jax.Array, v_ref: jax.Array,
                            lam: jax.Array, n_img: int, *, block_sizes: BlockSizes | None = None,
                            interpret: bool | None = None, platform: str | None = None,
                            layout: Layout | None = None) -> tuple[jax.Array, jax.Array]:
    """One softmax over [base; reference] keys with lambda added on the reference columns for the first `n_img`
    queries and the text queries kept off them: out (B, Nq, H, D), lse (B, H, Nq) over all the keys it read.

    q: (B, Nq, H, D) image queries first; k, v: (B, Nk, H, D); k_ref, v_ref: (B or 1, R, H, D); lam: (H,) or
    (B, H) float32 (-inf: the reference carries no mass, the output is the base attention's). block_sizes,
    interpret, platform, layout: as in `flash_attention`.
    """
    _check_shapes(q, k, v, k_ref, v_ref)
    b, nq, h, _ = q.shape
    lam = jnp.asarray(lam, jnp.float32)
    if lam.shape not in ((h,), (b, h)):
        raise ValueError(f"lambda must be (H,) or (B, H) = {(h,)} or {(b, h)}, got {lam.shape}.")
    spec = _spec(q, k.shape[1], k_ref.shape[1], block_sizes, interpret, platform, layout)
    k_ref = jnp.broadcast_to(k_ref, (b,) + k_ref.shape[1:]).astype(k.dtype)
    v_ref = jnp.broadcast_to(v_ref, (b,) + v_ref.shape[1:]).astype(v.dtype)
    nq_p = nq + (-nq % spec.block_q)
    is_img = jnp.arange(nq_p) < n_img  # (Nq_p,): text rows and padding read no reference
    row_bias = jnp.where(is_img, jnp.broadcast_to(lam.reshape(-1, h), (b, h))[..., None, None], -jnp.inf)  # (B, H, 1, Nq_p)
    ref = (_to_kernel_layout(k_ref, spec.block_k), _to_kernel_layout(v_ref, spec.block_k), row_bias)
    out, lse = _flash(_to_kernel_layout(q, spec.block_q), _to_kernel_layout(k, spec.block_k),
                      _to_kernel_layout(v, spec.block_k), ref, spec)
    return _finish(out, lse, nq)
