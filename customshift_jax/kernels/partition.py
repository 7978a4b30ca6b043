"""The kernels on a mesh: XLA cannot split a Mosaic (or Triton) call by itself ("Mosaic kernels cannot be
automatically partitioned"), so under a `jax.set_mesh` of more than one device the kernel runs in a
`jax.shard_map`, each device on its own samples and heads (attention is independent per sample and head),
tokens and head dim whole. Heads go over the mesh axes in `HEAD_AXES` (the "tensor" axis of
`parallel.sharding`'s rule sets), the batch over the others; where the rules laid q out otherwise, XLA
reshards at the boundary (a token axis split for context parallelism is gathered), and mesh axes that divide
neither run the same shard redundantly."""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec

HEAD_AXES = ("tensor",)  # mesh axes that split heads when they divide them; every other axis tries the batch


def mesh_of_context():
    """The mesh set by `jax.set_mesh` (abstract), or None when there is none or it has a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return None
    return mesh


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


def per_sample_and_head(fn: Callable, *arrays, n_outs: int):
    """`fn(*arrays)` (every array and output (B, H, ...)) run per shard of (B, H) on the context mesh; plain
    `fn(*arrays)` without a mesh of several devices."""
    mesh = mesh_of_context()
    if mesh is None:
        return fn(*arrays)
    b, h = arrays[0].shape[:2]
    batch_axes, head_axes = layout(dict(zip(mesh.axis_names, mesh.axis_sizes)), b, h)
    spec = PartitionSpec(batch_axes or None, head_axes or None)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=(spec,) * n_outs,
                            check_vma=False)
    return sharded(*arrays)
