"""JAX beside PyTorch on this CPU, every row of issue 27 in one process: MMDiT forward, 28-step sampling with
CFG, the CustomShift LoRA training step, the subject world's base training step, VAE encode and decode.

Each row runs both sides interleaved (one warm-up each, then J T J T ...), median of --runs; the JAX compile is
done ahead and reported apart. Relative error: max |jax - torch| / max |torch| of the outputs (training rows:
the loss and the params after one step from the same weights).
Defaults (about 10 minutes on 2 cores): sd3-medium width, 4 layers, 512 px, batch 1, fp32; the base step at the
world's size (tiny SD3, batch 32). `--quick`: tiny sizes, a smoke test. `--markdown`: the README table.
  python bench/cpu_vs_torch.py
  python bench/cpu_vs_torch.py --quick --rows forward,vae-decode
"""
from __future__ import annotations

import argparse
import sys
import time

ROWS = ("forward", "sample", "lora-step", "base-step", "vae-encode", "vae-decode")
QUICK = {"layers": 2, "size": 16, "text_len": 32, "sample_text_len": 32, "steps": 4, "subject_len": 16, "train_text_len": 32,
         "base_batch": 4, "vae_size": 16, "runs": 2}


def parse(argv=None) -> argparse.Namespace:
    from _common import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    add_model_args(p)
    p.add_argument("--text-len", type=int, default=154, help="prompt tokens of the forward row")
    p.add_argument("--sample-text-len", type=int, default=333, help="prompt tokens of the sampling row (77 + 256)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--subject-len", type=int, default=77, help="subject-name tokens of the LoRA step")
    p.add_argument("--train-text-len", type=int, default=154, help="prompt tokens of the LoRA step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--base-batch", type=int, default=32, help="the world's base step batch (world-base.yaml)")
    p.add_argument("--lora-remat", default="dots", choices=["none", "dots", "full"],
                   help="train.remat of the LoRA step (dots: the fastest on the CPU, docs/performance.md)")
    p.add_argument("--base-remat", choices=["none", "dots", "full"],
                   help="train.remat of the base step (default: world-base.yaml's, what the world trains with)")
    p.add_argument("--vae-size", type=int, default=64, help="VAE latent size (64 = 512 px)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each side per row (median)")
    p.add_argument("--sample-runs", type=int, default=1, help="timed runs of the sampling row (no warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--markdown", action="store_true", help="print the README table (CPU and threads included)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.sample_runs = 1
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        p.error(f"--rows: unknown {','.join(unknown)}; expected a subset of {','.join(ROWS)}")
    return args


def _seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def build_case(name: str, args):
    """The `Case` of row `name` at the sizes `args` asks for (a `parse()` result)."""
    from _cases import forward_case, sampling_case, vae_case
    from _common import mmdit_pair
    from _train_cases import lora_step_case

    if name == "forward":
        return forward_case(mmdit_pair(args.preset, args.layers), batch=args.batch, size=args.size,
                            text_len=args.text_len)
    if name == "sample":
        return sampling_case(mmdit_pair(args.preset, args.layers), batch=args.batch, size=args.size,
                             text_len=args.sample_text_len, steps=args.steps, guidance=args.guidance)
    if name == "lora-step":
        return lora_step_case(mmdit_pair(args.preset, args.layers), batch=args.batch, size=args.size,
                              text_len=args.train_text_len, subject_len=args.subject_len, rank=args.rank,
                              remat=args.lora_remat)
    if name == "base-step":
        return _base_case(args)
    if name in ("vae-encode", "vae-decode"):
        return vae_case(name.removeprefix("vae-"), batch=args.batch, size=args.vae_size)
    raise ValueError(f"unknown row {name!r}; expected one of {', '.join(ROWS)}.")


def run_rows(args) -> list[dict]:
    """Build each asked row's case, time it interleaved, and print a line per row as it finishes."""
    from _common import interleaved

    rows = args.rows.split(",")
    results = []
    for name in ROWS:
        if name not in rows:
            continue
        t0 = time.perf_counter()
        case = build_case(name, args)
        try:
            sample = name == "sample"
            timing = interleaved(case.run_jax, case.run_torch, args.sample_runs if sample else args.runs,
                                 warmup=not sample)
            err = case.errors(timing.jax_out, timing.torch_out)
        finally:
            case.close()
        r = {"row": name, "shape": case.shape, "jax_s": timing.jax_s, "torch_s": timing.torch_s,
             "ratio": timing.ratio, "error": err, "compile_s": case.compile_s,
             "runs": len(timing.jax_runs), "wall_s": time.perf_counter() - t0}
        print(f"{name:11s} {case.shape:50s} jax {_seconds(r['jax_s']):>9s}  torch {_seconds(r['torch_s']):>9s}  "
              f"ratio {r['ratio']:5.2f}  rel err {err}  (jax compile {r['compile_s']:.1f} s, median of {r['runs']}, "
              f"row {r['wall_s']:.0f} s)", flush=True)
        results.append(r)
    return results


def _base_case(args):
    from _common import mmdit_pair
    from _train_cases import base_step_case

    from customshift_jax.toyworld.tiny_sd3 import TRANSFORMER_CONFIG

    pair = mmdit_pair(diffusers_config=TRANSFORMER_CONFIG)
    return base_step_case(pair, batch=args.base_batch, size=TRANSFORMER_CONFIG["sample_size"],
                          text_len=_world_text_len(), remat=args.base_remat or _world_base_remat())


def _world_base_remat() -> str:
    """train.remat of the world's base training (train/configs/world-base.yaml)."""
    import yaml

    from customshift_jax.toyworld.build import CONFIGS

    return yaml.safe_load((CONFIGS / "world-base.yaml").read_text())["train"].get("remat", "none")


def _world_text_len() -> int:
    """The world's prompt length: CLIP + T5 tokens."""
    from customshift_jax.toyworld.tiny_sd3 import CLIP_MAX_LENGTH, T5_MAX_LENGTH

    return CLIP_MAX_LENGTH + T5_MAX_LENGTH


def markdown(results: list[dict], cpu: dict) -> str:
    """The README table: one line per row, then the CPU, its vector extensions and the thread counts."""
    lines = ["| Row | Shape | JAX | PyTorch | JAX / PyTorch | Relative error |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['shape']} | {_seconds(r['jax_s'])} | {_seconds(r['torch_s'])} | "
                     f"{r['ratio']:.2f} | {r['error']} |")
    from _common import describe_cpu_line

    lines.append("")
    lines.append(describe_cpu_line(cpu) + "; fp32, matmul precision highest, interleaved runs, medians.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    from _common import cpu_description, describe_cpu_line, setup_jax

    setup_jax()
    cpu = cpu_description()
    print(describe_cpu_line(cpu), flush=True)
    t0 = time.perf_counter()
    results = run_rows(args)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.markdown:
        print(markdown(results, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
