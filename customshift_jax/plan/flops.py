"""Matmul FLOPs of a step, every layer counted: a walk of the traced program (jaxpr), and the analytic count.

XLA's cost analysis counts a scanned group's body once (38 scanned layers look like one or two). The jaxpr
keeps each `scan` with its `length`, so walking it and multiplying a body by its length counts every layer;
`cond` takes its costliest branch, a Pallas kernel's body is multiplied by its grid, remat and custom-vjp
bodies are entered (what the backward pass recomputes is counted, as it runs). Counted: dot_general (2 x
output size x contracted size) and convolutions (2 x output size x kernel size / output features); the
elementwise work (norms, softmax, the CustomShift merge) is not, as usual for MFU.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from customshift_jax.models.mmdit.config import MMDiTConfig


def _size(var: Any) -> int:
    return math.prod(getattr(var.aval, "shape", ()))


def _sub_jaxprs(value: Any):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        return 2.0 * _size(eqn.outvars[0]) * math.prod(lhs_shape[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs_shape = eqn.invars[1].aval.shape
        out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * _size(eqn.outvars[0]) * math.prod(rhs_shape) / out_features
    return 0.0


def jaxpr_flops(jaxpr: Any) -> float:
    """Matmul FLOPs of one run of `jaxpr` (see the module doc for how loops and kernels are weighted)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        name = eqn.primitive.name
        if name == "cond":
            total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
            continue
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "scan":
            weight = eqn.params["length"]
        elif name == "pallas_call":
            weight = math.prod(eqn.params["grid_mapping"].grid)
        else:
            weight = 1
        if name == "custom_vjp_call" or name == "custom_jvp_call":
            subs = subs[:1]  # the primal body; the rule's own jaxprs are not run in the primal
        total += weight * sum(jaxpr_flops(j) for j in subs)
    return total


def count_flops(fn: Callable, *args: Any) -> float:
    """Matmul FLOPs of one call of `fn` on these arguments (arrays or ShapeDtypeStructs), every layer counted."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def mmdit_forward_flops(config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int, *,
                        reference_tokens: int = 0) -> float:
    """The analytic matmul FLOPs of one MMDiT forward (diffusers' SD3Transformer2DModel) on `batch` samples.

    `reference_tokens` R > 0 adds CustomShift's reference attention: every image query of every layer also reads
    R reference keys and values (QK^T and PV: 4 x B x N x R x D).
    """
    b, n, m, d = batch, image_tokens, text_tokens, config.inner_dim
    p, c = config.patch_size, config.in_channels
    total = 2.0 * b * n * (c * p * p) * d                                      # patch embedding
    total += 2.0 * b * (256 * d + d * d + config.pooled_projection_dim * d + d * d)  # timestep + pooled MLPs
    total += 2.0 * b * m * config.joint_attention_dim * config.caption_projection_dim  # context_embedder
    for index in range(config.num_layers):
        dual, pre_only = config.block_kind(index)
        total += 2.0 * b * d * (9 if dual else 6) * d                           # norm1 (AdaLN-Zero)
        total += 2.0 * b * d * (2 if pre_only else 6) * d                       # norm1_context
        total += 2.0 * b * (n + m) * 3 * d * d                                  # q, k, v of both streams
        total += 4.0 * b * (n if pre_only else n + m) * (n + m) * d             # joint attention (last: image queries)
        total += 2.0 * b * n * d * d + (0 if pre_only else 2.0 * b * m * d * d)  # to_out, to_add_out
        total += 16.0 * b * n * d * d + (0 if pre_only else 16.0 * b * m * d * d)  # ff, ff_context (4x)
        if dual:
            total += 2.0 * b * n * 4 * d * d + 4.0 * b * n * n * d              # attn2: q, k, v, out; attention
        if reference_tokens:
            total += 4.0 * b * n * reference_tokens * d                         # CustomShift: image queries x R
    total += 2.0 * b * d * 2 * d                                                # norm_out
    total += 2.0 * b * n * d * (p * p * config.out_channels)                    # proj_out
    return total
