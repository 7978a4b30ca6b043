"""Shared pieces of the CPU benchmarks that put JAX beside PyTorch: the MMDiT pair on the same weights, the SD3
pipeline and inputs of the sampling row, interleaved median timing, and the CPU description.

Imported by bench/forward.py, sample.py, vae.py, train.py, cpu_vs_torch.py and profile_cpu.py (as `_common`:
run them as scripts). Importing it picks no JAX platform; `setup_jax` picks the CPU.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

# The x86 vector extensions that decide which GEMM kernels XLA (Eigen / XNNPACK / oneDNN) and torch (oneDNN / MKL)
# pick, in /proc/cpuinfo's spelling.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


def add_model_args(parser) -> None:
    """The MMDiT size flags every CPU benchmark shares: --preset, --layers, --size, --batch (issue 27's defaults)."""
    parser.add_argument("--preset", default="sd3-medium")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=1)


def setup_jax() -> None:
    """JAX on the CPU (unless JAX_PLATFORMS says otherwise) with fp32 matmuls at full precision, the parity the
    benchmarks check. Call it before the first JAX computation."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


@dataclasses.dataclass
class MMDiTPair:
    """diffusers' SD3 transformer with random weights and the same weights as our params tree."""

    config: Any  # MMDiTConfig
    model: Any  # diffusers SD3Transformer2DModel
    params: Any  # JAX params


def mmdit_pair(preset: str | None = "sd3-medium", layers: int | None = 4, dtype: str = "float32", seed: int = 0,
               diffusers_config: dict | None = None) -> MMDiTPair:
    """`preset` at `layers` layers (or a whole `diffusers_config`), random torch weights mapped to JAX params."""
    import jax
    import jax.numpy as jnp

    from customshift_jax import MMDiTConfig, get_preset
    from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
    from customshift_jax.models.mmdit.options import as_dtype
    from customshift_jax.models.mmdit.mapping import params_from_state_dict

    if diffusers_config is None:
        diffusers_config = {**get_preset(preset).to_diffusers_config(), "num_layers": layers}
    config = MMDiTConfig.from_diffusers_config(diffusers_config)
    model = random_diffusers_transformer(config, seed=seed, dtype=dtype)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, as_dtype(dtype)),
                                    params_from_state_dict(config, model.state_dict()))
    return MMDiTPair(config, model, params)


def sd3_pipeline(model):
    """diffusers' StableDiffusion3Pipeline around `model` with SD3's scheduler (shift 3), a tiny VAE and null text
    encoders (the benchmarks give embeddings and take latents out)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from customshift_jax.testing.tiny_pipeline import DEFAULT_VAE_CONFIG

    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**DEFAULT_VAE_CONFIG),
        **dict.fromkeys(["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                         "tokenizer_3"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclasses.dataclass
class Timing:
    """Median seconds of each side over the timed runs, and each side's first output."""

    jax_s: float
    torch_s: float
    jax_out: Any
    torch_out: Any
    jax_runs: list[float]
    torch_runs: list[float]

    @property
    def ratio(self) -> float:
        return self.jax_s / self.torch_s


def interleaved(run_jax: Callable[[], Any], run_torch: Callable[[], Any], runs: int, warmup: bool = True) -> Timing:
    """Alternate JAX and torch runs (J T J T ...) so that load on a shared machine hits both alike; median of
    `runs` each. With `warmup`, one untimed run of each first (its output is the one returned)."""
    outs: dict[str, Any] = {}
    times: dict[str, list[float]] = {"jax": [], "torch": []}
    if warmup:
        outs["jax"], outs["torch"] = run_jax(), run_torch()
    for _ in range(runs):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            outs.setdefault(name, out)
    return Timing(statistics.median(times["jax"]), statistics.median(times["torch"]), outs["jax"], outs["torch"],
                  times["jax"], times["torch"])


def cpu_description() -> dict[str, Any]:
    """CPU model, its vector extensions, cores this process may use, and each side's intra-op threads."""
    import torch

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "vector": [f for f in VECTOR_FLAGS if f in flags], "cores": cores,
            "torch_threads": torch.get_num_threads(),
            # XLA:CPU runs its intra-op work (Eigen / XNNPACK GEMM tiles, parallel loops) on a pool of one thread
            # per schedulable core; docs/performance.md shows it in the profile.
            "xla_threads": cores, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def describe_cpu_line(cpu: dict[str, Any]) -> str:
    """One line of `cpu_description`."""
    return (f"CPU {cpu['model']} ({', '.join(cpu['vector']) or 'no AVX'}), {cpu['cores']} cores; "
            f"threads: torch {cpu['torch_threads']}, XLA {cpu['xla_threads']}"
            + (f"; XLA_FLAGS={cpu['xla_flags']}" if cpu["xla_flags"] else ""))
