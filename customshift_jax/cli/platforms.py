"""Keep libtpu quiet where there is no TPU: with the `[tpu]` extra installed (the TPU compiler `plan` uses), jax
tries libtpu at start-up on every machine and prints worker-hostname errors where no TPU is attached."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")


def tpu_attached() -> bool:
    """Whether this host has TPU chips: their device nodes (/dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_absent_tpu() -> None:
    """Before jax is imported: with libtpu installed but no TPU attached, run on the CPU (or the GPU when a GPU
    plugin is installed) without libtpu's start-up errors. JAX_PLATFORMS set by the user always wins."""
    if "jax" in sys.modules or os.environ.get("JAX_PLATFORMS") or tpu_attached():
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    if not any(importlib.util.find_spec(p) for p in GPU_PLUGINS):
        os.environ["JAX_PLATFORMS"] = "cpu"
        return
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)
