"""A TPU slice (or several) described by libtpu without a TPU: its devices, hosts, chip figures, and the mesh a
run on it would use (`parallel.sharding.make_mesh`: the DCN-crossing data axis outermost over slices)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

from customshift_jax.parallel import sharding as shd
from customshift_jax.plan.hardware import Chip, canonical_topology, chip_for

INSTALL_HINT = 'pip install -e ".[tpu]"  (libtpu, pinned to the jax this project tests with)'


@dataclasses.dataclass(frozen=True)
class Pod:
    """The devices of `num_slices` slices of `topology`, with what a plan reports about them."""

    topology: str
    num_slices: int
    devices: tuple[Any, ...]
    chip: Chip
    per_device: float  # fraction of a chip one JAX device is (v4 exposes both TensorCores: 0.5)

    @property
    def chips(self) -> int:
        return round(len(self.devices) * self.per_device)

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hbm_bytes_per_device(self) -> int:
        return int(self.chip.hbm_bytes * self.per_device)


def libtpu_available() -> bool:
    """True when libtpu (the TPU compiler) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu(name: str, num_slices: int) -> None:
    """Settings libtpu reads from a TPU VM's metadata; set here (unless given) so that it neither probes for a
    metadata server nor prints worker-hostname errors on a machine without a TPU. Compiling only: several
    planners may hold libtpu at once."""
    gen, dims = name.split(":")
    chips = math.prod(int(d) for d in dims.split("x")) * num_slices
    accelerator = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}.get(gen, f"{gen}-{2 * chips}")
    for key, value in (("JAX_PLATFORMS", "cpu"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", accelerator)):
        os.environ.setdefault(key, value)


def load_pod(topology: str, num_slices: int = 1) -> Pod:
    """The devices of `num_slices` x `topology` from libtpu (no TPU needed); one-line errors for a bad name,
    a missing libtpu, or a slice smaller than one host."""
    name = canonical_topology(topology)
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}.")
    if not libtpu_available():
        raise ValueError(f"planning for TPUs needs libtpu, the TPU compiler; install it with: {INSTALL_HINT}")
    _quiet_libtpu(name, num_slices)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu's own words, cut to one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"libtpu refused topology {name!r} ({first[:200]}); a slice is at least one host "
                         "(v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1).") from None
    devices = tuple(desc.devices)
    dims = [int(d) for d in name.split(":")[1].split("x")]
    per_device = math.prod(dims) * num_slices / len(devices)
    return Pod(name, num_slices, devices, chip_for(name), per_device)


def pod_mesh(pod: Pod, sizes: dict[str, int]) -> Any:
    """The mesh `customshift train` would build on this pod from `--mesh` sizes (one may be -1)."""
    full = shd.mesh_shape(len(pod.devices), **sizes)
    return shd.make_mesh(**full, devices=list(pod.devices))
