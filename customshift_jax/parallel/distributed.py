"""Multi-host runs (DESIGN section 5): `jax.distributed` start-up, per-process data, orbax sharded checkpoints.

Every process runs the same program on one global mesh (`sharding.make_mesh` over `jax.devices()`); each
loads only its part of the batch (`process_slice`, `global_batch_array`); params are saved and restored
shard by shard by all processes together (`save_sharded`, `restore_sharded`). See docs/multihost.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from customshift_jax.parallel.sharding import RulesLike, logical_sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
               cpu_collectives: str | None = "gloo", **kwargs: Any) -> None:
    """Join the multi-process job: `jax.distributed.initialize`, before any other JAX call.

    Arguments left None come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set,
    else from JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI, Kubernetes). CPU processes
    talk through `cpu_collectives` ("gloo"); the setting only affects the CPU backend. Idempotent.
    """
    if jax.distributed.is_initialized():
        return
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is outside 0..{num_processes - 1} (num_processes {num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)


def shutdown() -> None:
    """Leave the job (all processes should call it; a no-op when not initialized)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _rows(sharding: NamedSharding, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[0].indices(shape[0]) if index else (0, shape[0], 1)
        rows.add((start, stop))
    return sorted(rows)


def process_slice(global_batch: int, sharding: NamedSharding | None = None) -> slice:
    """The rows of a global batch this process loads.

    With `sharding` (of the batch-leading array), the rows its local devices hold; without, an even
    contiguous split by process index. Either way a slice, so a data loader reads only its part.
    """
    if sharding is not None:
        rows = _rows(sharding, (global_batch,))
        start, stop = rows[0]
        for a, b in rows[1:]:
            if a > stop:
                raise ValueError(f"this process's rows {rows} of the batch are not contiguous; order the mesh so "
                                 "that each process holds one block of the batch.")
            stop = max(stop, b)
        return slice(start, stop)
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} does not divide over {n} processes.")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch_array(local_data: Any, mesh: Mesh, rules: RulesLike, logical: Sequence[str | None],
                       global_shape: Sequence[int]) -> jax.Array:
    """One global array from each process's rows (`local_data[process_slice(...)]`), laid out by `rules`."""
    global_shape = tuple(global_shape)
    logical = tuple(logical) + (None,) * (len(global_shape) - len(logical))
    sharding = logical_sharding(logical, global_shape, mesh, rules)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_data), global_shape)


def gather(tree: Any) -> Any:
    """Every leaf as a full numpy array on every process (a collective: all processes must call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_counts(counts: Sequence[int]) -> np.ndarray:
    """Every process's `counts` (small non-negative integers), as (processes, len(counts)) on every process."""
    local = np.asarray(counts, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def save_sharded(path: str | Path, tree: Any, *, force: bool = False) -> Path:
    """Save a tree of (sharded) arrays with orbax; every process calls it and writes its own shards.

    `path` must be the same shared location on every process (a bucket or shared filesystem); returns it.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, tree, force=force)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return path


def restore_sharded(path: str | Path, abstract_tree: Any) -> Any:
    """Restore into `abstract_tree`'s layout: ShapeDtypeStructs with shardings (`sharding.abstract_params`).

    Each process reads only the shards its devices hold. A missing path is a clear error.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint there (save_sharded writes one).")
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(path, abstract_tree)
    finally:
        checkpointer.close()


__all__ = ["initialize", "shutdown", "process_slice", "global_batch_array", "gather", "save_sharded",
           "restore_sharded"]
