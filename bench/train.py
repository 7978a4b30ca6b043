"""Training-step benchmark: steps/s, peak memory and FLOPs per step (XLA cost analysis of 1 and 2 layers,
extrapolated: the scanned layers' body is counted once by the analysis), MFU on GPU/TPU.

Default: sd3-medium width with 4 layers, 512 px (64x64 latents), batch 1, LoRA rank 16, fp32 and bf16.
  python bench/train.py                                  # as above
  python bench/train.py --size 32 --layers 2 --text-len 77 --steps 2   # smaller, for a busy CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense peak FLOP/s per chip by device kind (bf16 tensor-core / MXU; fp32 rows are the non-TF32 vector peak).
PEAK_FLOPS = {
    "TPU v4": {"bf16": 275e12, "fp32": 275e12},
    "TPU v5 lite": {"bf16": 197e12, "fp32": 197e12},  # v5e
    "TPU v5e": {"bf16": 197e12, "fp32": 197e12},
    "TPU v5p": {"bf16": 459e12, "fp32": 459e12},
    "TPU v6 lite": {"bf16": 918e12, "fp32": 918e12},  # v6e
    "NVIDIA H100": {"bf16": 989e12, "fp32": 67e12},
    "NVIDIA H200": {"bf16": 989e12, "fp32": 67e12},
    "NVIDIA A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def peak_flops(kind: str, dtype: str) -> float | None:
    for name, peaks in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peaks[dtype]
    return None


def _cost_flops(compiled) -> float:
    """XLA's cost-analysis FLOPs of a compiled executable (0 where the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def step_flops(config, lora, batch, make_step) -> tuple[float, str]:
    """FLOPs of one train step, all layers counted: XLA's cost analysis counts a scanned block group's body
    once, whatever its length, so compile 1 and 2 layers (shapes only) and extrapolate linearly."""
    import jax

    from customshift_jax.models.mmdit.api import init_mmdit
    from customshift_jax.train.optim import make_optimizer
    from customshift_jax.train.step import init_train_state

    layers = config.num_layers
    dual = set(config.dual_attention_layers)
    if layers > 2 and len({i in dual for i in range(layers - 1)}) > 1:
        note = "extrapolated from layer 0's kind (dual and plain attention layers mixed: approximate)"
    else:
        note = "1- and 2-layer cost analysis, extrapolated"
    costs = []
    for n in (1, 2):
        cfg = dataclasses.replace(config, num_layers=n, dual_attention_layers=tuple(i for i in dual if i < n - 1))
        opt, _ = make_optimizer(1e-4)
        state = jax.eval_shape(lambda: init_train_state(cfg, lora, opt, 0))
        base = jax.eval_shape(lambda k: init_mmdit(cfg, k), jax.random.key(0))
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        costs.append(_cost_flops(jax.jit(make_step(cfg, opt)).lower(state, base, shapes).compile()))
    return costs[0] + (layers - 1) * (costs[1] - costs[0]), note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd3-medium")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px), as in every bench")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--text-len", type=int, default=333, help="prompt tokens (77 CLIP + 256 T5)")
    p.add_argument("--subject-len", type=int, default=333, help="subject-name tokens")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--remat", default="none", choices=["none", "dots", "full"])
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from _train_cases import train_batch

    from customshift_jax.models.mmdit.api import init_mmdit
    from customshift_jax.models.mmdit.config import get_preset
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.train.optim import make_optimizer
    from customshift_jax.train.step import init_train_state, make_train_step

    config = dataclasses.replace(get_preset(args.preset), num_layers=args.layers)
    lora = LoRAConfig(args.rank, float(args.rank))
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), {config.num_layers} layers width "
          f"{config.num_attention_heads * config.attention_head_dim}, {args.size * 8} px batch {args.batch} rank {args.rank}",
          flush=True)
    batch = train_batch(config, batch=args.batch, size=args.size, text_len=args.text_len,
                        subject_len=args.subject_len)
    results = []
    for dtype in args.dtypes.split(","):
        base = jax.jit(lambda k: init_mmdit(config, k, param_dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32))(
            jax.random.key(0))
        opt, sched = make_optimizer(1e-4)
        state = init_train_state(config, lora, opt, 0)
        options = RunOptions(dtype=dtype, remat=args.remat)
        step = jax.jit(make_train_step(config, lora, opt, options, seed=0, schedule=sched),
                       donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = step.lower(state, base, batch).compile()
        compile_s = time.perf_counter() - t0
        raw_flops = _cost_flops(compiled)
        flops, flops_note = step_flops(config, lora, batch, lambda c, o: make_train_step(
            c, lora, o, options, seed=0))
        mem = compiled.memory_analysis()
        est_peak = None
        if mem is not None:
            est_peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                        - getattr(mem, "alias_size_in_bytes", 0))
        state, m = compiled(state, base, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = compiled(state, base, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / args.steps
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", est_peak)
        pk = peak_flops(dev.device_kind, dtype) if jax.default_backend() != "cpu" else None
        r = {"dtype": dtype, "compile_s": round(compile_s, 1), "step_s": round(dt, 3), "steps_per_s": round(1 / dt, 4),
             "images_per_s": round(args.batch / dt, 4), "flops_per_step": flops, "flops_source": flops_note,
             "flops_cost_analysis_raw": raw_flops, "achieved_tflops": flops / dt / 1e12,
             "peak_memory_gib": None if peak is None else round(peak / 2 ** 30, 3),
             "peak_memory_source": "device.memory_stats" if "peak_bytes_in_use" in stats else "compiled.memory_analysis",
             "mfu": None if pk is None else flops / dt / pk, "loss": float(m["loss"])}
        print(json.dumps(r), flush=True)
        results.append(r)
        del state, base
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": dev.device_kind, "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
