"""The kernels on a mesh: XLA cannot split a Mosaic (or Triton) call by itself ("Mosaic kernels cannot be
automatically partitioned"), so under a `jax.set_mesh` of more than one device the kernel runs in a
`jax.shard_map`, each device on its own samples and heads (attention is independent per sample and head),
tokens and head dim whole. Heads go over the mesh axes in `HEAD_AXES` (the "tensor" axis of
`parallel.sharding`'s rule sets), the batch over the others; where the rules laid q out otherwise, XLA
reshards at the boundary (a token axis split for context parallelism is gathered), and mesh axes that divide
neither run the same shard redundantly. A given layout (`RunOptions.kernel_layout`, carried to the kernels in
their `KernelSpec`) names the axes instead."""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import AxisType, PartitionSpec

HEAD_AXES = ("tensor",)  # mesh axes that split heads when they divide them; every other axis tries the batch
Layout = tuple[tuple[str, ...], tuple[str, ...]]  # (batch axes, head axes)


def mesh_of_context():
    """(the abstract mesh set by `jax.set_mesh`, {axis: size} of its axes not already manual, i.e. not taken
    by an enclosing shard_map), or None when no such axis has more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
             if kind != AxisType.Manual}
    return (mesh, sizes) if math.prod(sizes.values()) > 1 else None


def layout(axis_sizes: dict[str, int], batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes): `HEAD_AXES` that divide the heads, then in mesh order every other axis that
    divides what is left of the batch, then of the heads; axes of size 1 are left out."""
    def take(names, n, used):
        axes = []
        for name in names:
            size = axis_sizes[name]
            if size > 1 and name not in used and (n // math.prod(axis_sizes[a] for a in axes)) % size == 0:
                axes.append(name)
        return tuple(axes)

    head_axes = take([a for a in HEAD_AXES if a in axis_sizes], heads, ())
    batch_axes = take(list(axis_sizes), batch, head_axes)
    left = heads // math.prod(axis_sizes[a] for a in head_axes)
    head_axes += take(list(axis_sizes), left, head_axes + batch_axes)
    return batch_axes, head_axes


def per_sample_and_head(fn: Callable, *arrays, n_outs: int, given: Layout | None = None):
    """`fn(*arrays)` (every array and output (B, H, ...)) run per shard of (B, H) on the context mesh; plain
    `fn(*arrays)` without a mesh of several devices. `given` (batch axes, head axes) overrides `layout`'s choice,
    e.g. the rule set's layout of q, so XLA moves nothing at the kernel boundary (`layout` differs where a rule
    set orders the batch ("fsdp", "data"))."""
    context = mesh_of_context()
    if context is None:
        return fn(*arrays)
    mesh, sizes = context
    b, h = arrays[0].shape[:2]
    batch_axes, head_axes = given or layout(sizes, b, h)
    spec = PartitionSpec(batch_axes or None, head_axes or None)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=(spec,) * n_outs,
                            axis_names=set(sizes), check_vma=False)
    return sharded(*arrays)
