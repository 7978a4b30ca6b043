"""The Pallas kernels of flash attention with an optional shifted reference segment: forward (online softmax,
out and LSE), dq (and the reference rows' bias gradient), dk/dv. Layout (B, H, N, D), lengths already padded
to the blocks; the valid key counts are static and masked in the last key block.

Keys come in one or two segments, read in one pass: the base keys [x; c] (no bias) and, for the shift, the
reference keys [r; s] with a per-row bias (lambda for image rows, -inf for text rows and padding), so no dense
(Nq, Nk + R) bias exists. A grid program owns one (sample, head, query block) and loops over key blocks (the
Triton-style kernel: whole per-(sample, head) K/V blocks, sliced with `pl.ds`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from customshift_jax.kernels.partition import Layout, per_sample_and_head

NEG_INF = float("-inf")
ROW_LANES = 128  # lanes of a TPU vector register


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static facts of one call: blocks, the valid base / reference key counts (nr = 0: no reference), the
    softmax scale, interpret mode and the platform's compiler parameters (None in interpret mode)."""

    block_q: int
    block_k: int
    nk: int
    nr: int
    scale: float
    interpret: bool
    platform: str
    layout: Layout | None = None  # the mesh axes of (batch, heads) on a mesh (None: `partition.layout` chooses)

    def compiler_params(self, n_grid: int):
        if self.interpret:
            return None
        if self.platform == "gpu":
            from jax.experimental.pallas import triton as pltriton
            return pltriton.CompilerParams(num_warps=4, num_stages=2)
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)


def _contract(a, b, dims):
    """float32-accumulated dot_general. Half-precision operands get the default precision: a global
    `jax_default_matmul_precision="highest"` would ask Mosaic for an fp32 contraction of bf16 operands, which it
    refuses ("Bad lhs type"); float32 operands keep the configured precision."""
    precision = lax.Precision.DEFAULT if jnp.dtype(a.dtype).itemsize < 4 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """a (M, D) . b (N, D)^T -> (M, N) float32."""
    return _contract(a, b, ((1,), (1,)))


def _dot(a, b):
    """a (M, K) . b (K, N) -> (M, N) float32."""
    return _contract(a, b, ((1,), (0,)))


def _t_dot(a, b):
    """a (K, M)^T . b (K, N) -> (M, N) float32."""
    return _contract(a, b, ((0,), (0,)))


def _logits(q, k, row_bias, start, n_valid: int, scale: float):
    """(bq, bk) float32 scaled logits of one key block starting at `start`, with the per-row bias, padded
    columns (index >= n_valid) at -inf."""
    s = _dot_t(q, k) * scale
    if row_bias is not None:
        s = s + row_bias[:, None]
    if n_valid % k.shape[0]:
        col = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < n_valid, s, NEG_INF)
    return s


def _as_row(x, spec: KernelSpec):
    """A per-query statistic (bq,) from a reduction over keys (Mosaic lays it out down the sublanes) in the
    lane layout of a (bq,) row block. On TPU through a (bq, 128) transpose: TPU v4 has no sublane gather, which
    Mosaic's direct relayout needs (v5e/v5p/v6e have it); the transpose is one (bq, 128) tile per query block."""
    if spec.platform != "tpu":
        return x
    return jnp.broadcast_to(x[:, None], (x.shape[0], ROW_LANES)).T[0]


# ---------------------------------------------------------------------------------------------- forward


def _online_softmax(q, k_ref, v_ref, row_bias, n_valid: int, spec: KernelSpec, carry):
    """Fold one key segment into the running (max, sum, acc) of every query row of the block."""
    bk = spec.block_k

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # (bk, D)
        v = v_ref[pl.ds(start, bk), :]
        s = _logits(q, k, row_bias, start, n_valid, spec.scale)  # (bq, bk)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + jnp.sum(p, axis=1), acc * corr[:, None] + _dot(p.astype(v.dtype), v)

    return lax.fori_loop(0, k_ref.shape[0] // bk, body, carry)


def _forward_kernel(*refs, spec: KernelSpec):
    if spec.nr:
        q_ref, k_ref, v_ref, kr_ref, vr_ref, bias_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    q = q_ref[...]  # (bq, D)
    bq, d = q.shape
    carry = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    # the base segment comes first: its first block holds a valid column, so every row's max is finite after it
    carry = _online_softmax(q, k_ref, v_ref, None, spec.nk, spec, carry)
    if spec.nr:
        carry = _online_softmax(q, kr_ref, vr_ref, bias_ref[...], spec.nr, spec, carry)
    m, l, acc = carry
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = _as_row(m + jnp.log(l), spec)


def _row_spec(spec: KernelSpec):
    """A (block_q,) slice of a (B, H, 1, N) float32 row (LSE, bias, delta): the unit axis keeps Mosaic's last
    two block dims legal."""
    return pl.BlockSpec((None, None, None, spec.block_q), lambda b, h, i: (b, h, 0, i))


def _query_spec(spec: KernelSpec, d: int):
    return pl.BlockSpec((None, None, spec.block_q, d), lambda b, h, i: (b, h, i, 0))


def _whole_spec(n: int, d: int, spec: KernelSpec):
    """All n rows of one (sample, head): fetched once per (sample, head), so on TPU one buffer, not the default
    two (VMEM: TPU v4 has 16 MiB scoped; a 2048 px sequence's double-buffered K/V alone exceed it)."""
    single = spec.platform == "tpu" and not spec.interpret
    return pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, 0, 0),
                        pipeline_mode=pl.Buffered(1) if single else None)


def _call(local, spec: KernelSpec, arrays: tuple, n_outs: int, **static):
    """`local(*arrays, spec=spec, **static)`, per sample and head on the mesh of `jax.set_mesh` if any."""
    return per_sample_and_head(lambda *a: local(*a, spec=spec, **static), *arrays, n_outs=n_outs,
                               given=spec.layout)


def forward(q, k, v, ref, spec: KernelSpec):
    """q (B, H, Nq_p, D), k/v (B, H, Nk_p, D), ref () or (k_ref, v_ref (B, H, Nr_p, D), row_bias (B, H, 1, Nq_p)
    float32) -> out (B, H, Nq_p, D) in q's dtype, lse (B, H, 1, Nq_p) float32."""
    return tuple(_call(_forward_local, spec, (q, k, v, *ref), 2))


def _forward_local(q, k, v, *ref, spec: KernelSpec):
    b, h, nq, d = q.shape
    grid = (b, h, nq // spec.block_q)
    in_specs = [_query_spec(spec, d), _whole_spec(k.shape[2], d, spec), _whole_spec(k.shape[2], d, spec)]
    if spec.nr:
        nr = ref[0].shape[2]
        in_specs += [_whole_spec(nr, d, spec), _whole_spec(nr, d, spec), _row_spec(spec)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, nq), jnp.float32)),
        grid=grid, in_specs=in_specs, out_specs=(_query_spec(spec, d), _row_spec(spec)),
        interpret=spec.interpret, compiler_params=spec.compiler_params(3), name="flash_forward",
    )(q, k, v, *ref)


# --------------------------------------------------------------------------------------------- backward


def _dq_segment(q, do, lse, delta, k_ref, v_ref, row_bias, n_valid: int, spec: KernelSpec, dq):
    """dq += dS K over one key segment; also returns the row sums of dS (the per-row bias gradient)."""
    bk = spec.block_k

    def body(j, carry):
        dq, dbias = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        p = jnp.exp(_logits(q, k, row_bias, start, n_valid, spec.scale) - lse[:, None])  # (bq, bk)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k), dbias + jnp.sum(ds, axis=1)

    return lax.fori_loop(0, k_ref.shape[0] // bk, body, (dq, jnp.zeros_like(lse)))


def _dq_kernel(*refs, spec: KernelSpec):
    if spec.nr:
        q_ref, k_ref, v_ref, kr_ref, vr_ref, bias_ref, do_ref, lse_ref, delta_ref, dq_ref, dbias_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    dq = jnp.zeros(q.shape, jnp.float32)
    dq, _ = _dq_segment(q, do, lse, delta, k_ref, v_ref, None, spec.nk, spec, dq)
    if spec.nr:
        dq, dbias = _dq_segment(q, do, lse, delta, kr_ref, vr_ref, bias_ref[...], spec.nr, spec, dq)
        dbias_ref[...] = _as_row(dbias, spec)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec: KernelSpec, n_valid: int, has_bias: bool):
    if has_bias:
        q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    k, v = k_ref[...], v_ref[...]  # (bk, D)
    bq, bk = spec.block_q, spec.block_k
    start_k = pl.program_id(2) * bk

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
        row_bias = bias_ref[rows] if has_bias else None
        p = jnp.exp(_logits(q, k, row_bias, start_k, n_valid, spec.scale) - lse[:, None])  # (bq, bk)
        dv = dv + _t_dot(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dk + _t_dot(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dq(q, k, v, ref, do, lse, delta, spec: KernelSpec):
    """dq (B, H, Nq_p, D), and with a reference the row bias gradient (B, H, 1, Nq_p) float32."""
    outs = _call(_dq_local, spec, (q, k, v, *ref, do, lse, delta), 1 + bool(spec.nr))
    return tuple(outs) if spec.nr else (outs[0], None)


def _dq_local(*arrays, spec: KernelSpec):
    q, k, v = arrays[:3]
    ref, (do, lse, delta) = arrays[3:-3], arrays[-3:]
    b, h, nq, d = q.shape
    nk = k.shape[2]
    in_specs = [_query_spec(spec, d), _whole_spec(nk, d, spec), _whole_spec(nk, d, spec)]
    out_shape, out_specs = [jax.ShapeDtypeStruct(q.shape, q.dtype)], [_query_spec(spec, d)]
    if spec.nr:
        nr = ref[0].shape[2]
        in_specs += [_whole_spec(nr, d, spec), _whole_spec(nr, d, spec), _row_spec(spec)]
        out_shape.append(jax.ShapeDtypeStruct((b, h, 1, nq), jnp.float32))
        out_specs.append(_row_spec(spec))
    in_specs += [_query_spec(spec, d), _row_spec(spec), _row_spec(spec)]
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec), out_shape=tuple(out_shape),
        grid=(b, h, nq // spec.block_q), in_specs=in_specs, out_specs=tuple(out_specs),
        interpret=spec.interpret, compiler_params=spec.compiler_params(3), name="flash_backward_dq",
    )(q, k, v, *ref, do, lse, delta)
    return tuple(outs)


def backward_dkv(q, k, v, row_bias, do, lse, delta, n_valid: int, spec: KernelSpec):
    """dk, dv (B, H, N_p, D) of one key segment (row_bias None for the base keys)."""
    bias = () if row_bias is None else (row_bias,)
    return tuple(_call(_dkv_local, spec, (q, k, v, *bias, do, lse, delta), 2, n_valid=n_valid))


def _dkv_local(*arrays, spec: KernelSpec, n_valid: int):
    has_bias = len(arrays) == 7
    q, k, v = arrays[:3]
    row_bias = arrays[3] if has_bias else None
    do, lse, delta = arrays[-3:]
    b, h, nq, d = q.shape
    n = k.shape[2]
    key_spec = pl.BlockSpec((None, None, spec.block_k, d), lambda b_, h_, j: (b_, h_, j, 0))
    rows_spec = pl.BlockSpec((None, None, None, nq), lambda b_, h_, j: (b_, h_, 0, 0))
    in_specs = [_whole_spec(nq, d, spec), key_spec, key_spec] + [rows_spec] * has_bias
    in_specs += [_whole_spec(nq, d, spec), rows_spec, rows_spec]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, n_valid=n_valid, has_bias=has_bias),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, h, n // spec.block_k), in_specs=in_specs, out_specs=(key_spec, key_spec),
        interpret=spec.interpret, compiler_params=spec.compiler_params(3), name="flash_backward_dkv",
    )(q, k, v, *([row_bias] if has_bias else []), do, lse, delta)
