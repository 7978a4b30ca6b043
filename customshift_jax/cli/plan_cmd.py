"""Plan a TPU pod run on this machine: compile the real step for a TPU slice with libtpu (no TPU needed).

Builds abstract params, optimizer state and batch with the real shardings (nothing is allocated), compiles the
entry point that `customshift train` / `generate` / `prepare` runs for the named topology with XLA:TPU, and
reports per-device memory against the chip's HBM, FLOPs per step (every scanned layer counted), the collectives
of the compiled program (count and bytes per chip, ICI / DCN), a roofline bound on the step time, and how the
batch splits over hosts. --sweep compiles several rule sets, meshes, remat policies and attention backends and
marks the fastest bound that fits. Needs libtpu: pip install -e ".[tpu]".

tasks:
  train-lora   the CustomShift LoRA step: RAB prefill + CGB forward in the loss, backward, AdamW
  train-base   the full-parameter base step (train.mode=base)
  sample       the whole scanned sampling loop (--steps, CFG, reading one reference's cache)
  sample-step  one sampler step: the CGB forward on [negative; positive] reading the cache
  prefill      the Reference-Alignment Branch: the reference cache of --batch references
  encode-text  SD3's CLIP-L, CLIP-G and T5-XXL (JAX) on --batch prompts

examples:
  customshift plan --topology v5p:4x4x4 --model sd3.5-large --task train-lora --batch 64 --mesh fsdp=-1
  customshift plan --topology v5e-16 --model sd3-medium --task sample --batch 16 --sweep
  customshift plan --topology v5p-64 --num-slices 2 --model sd3-medium --task train-lora --batch 128 \\
      --mesh data=2,fsdp=-1 --json plan.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

HELP = "compile the real train / sample steps for a TPU pod (libtpu, no TPU) and report memory, FLOPs, collectives"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from customshift_jax.models.mmdit.options import REMATS
    from customshift_jax.parallel.sharding import RULE_SETS
    from customshift_jax.plan.tasks import TASKS

    p.add_argument("--topology", required=True, metavar="NAME",
                   help="a TPU slice: GEN:AxB[xC] (v5p:4x4x4, v5e:4x4, v6e:8x8, v4:2x2x2) or a rental name (v5p-64)")
    p.add_argument("--num-slices", type=int, default=1, metavar="N", help="slices joined over DCN")
    p.add_argument("--model", default="sd3-medium", metavar="PRESET|CHECKPOINT",
                   help="a preset (sd3-medium, sd3.5-medium, sd3.5-large, tiny-...) or a checkpoint / diffusers "
                   "folder (only its transformer config.json is read)")
    p.add_argument("--task", choices=TASKS, default="train-lora", help="the entry point to compile")
    p.add_argument("--resolution", type=int, default=1024, metavar="PX", help="square image side in pixels")
    p.add_argument("--batch", type=int, default=None, metavar="GLOBAL",
                   help="global batch (images, references or prompts) (default: one per device)")
    p.add_argument("--mesh", default="fsdp=-1", metavar="AXES",
                   help="mesh sizes, e.g. fsdp=-1 or data=2,fsdp=4,tensor=4 (one size may be -1)")
    p.add_argument("--rules", default="fsdp", choices=tuple(RULE_SETS), help="the sharding rule set")
    p.add_argument("--attention", default="xla", choices=("xla", "blocked", "flash"),
                   help="attention backend (flash: the Pallas kernels, through Mosaic)")
    p.add_argument("--remat", default="none", choices=REMATS, help="rematerialisation per block")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute and frozen-weight dtype")
    p.add_argument("--lora-rank", type=int, default=16, metavar="R", help="LoRA rank of both branches")
    p.add_argument("--text-length", type=int, default=256, metavar="N", help="T5 tokens (prompt = 77 + N)")
    p.add_argument("--steps", type=int, default=28, metavar="T", help="sampling steps (--task sample)")
    p.add_argument("--no-cfg", action="store_true", help="sample without classifier-free guidance")
    p.add_argument("--sweep", action="store_true",
                   help="compile rule sets dp / fsdp / fsdp_tp (tensor = the largest of 8, 4, 2 dividing the heads), "
                   "remat none / full for training, and --attention's backend; print one table")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report (a list with --sweep) as JSON")


def model_config(spec: str) -> tuple[Any, str]:
    """(MMDiTConfig, name) from a preset name or a folder holding transformer/config.json or config.json."""
    from customshift_jax.models.mmdit.config import PRESETS, MMDiTConfig

    if spec in PRESETS:
        return PRESETS[spec], spec
    path = Path(spec)
    for candidate in (path / "transformer" / "config.json", path / "config.json", path):
        if candidate.is_file():
            return MMDiTConfig.from_json(candidate), path.name
    raise ValueError(f"--model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a folder with "
                     "transformer/config.json or config.json.")


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--resolution", args.resolution, 16), ("--lora-rank", args.lora_rank, 1),
                             ("--text-length", args.text_length, 1), ("--steps", args.steps, 1),
                             ("--num-slices", args.num_slices, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}.")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}.")
    if args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 16 (VAE x 8, patch 2).")


def sweep_candidates(args: argparse.Namespace, config: Any, n_devices: int, slices: int) -> list[dict[str, Any]]:
    """The --sweep grid: (mesh sizes, rules, remat, attention) per row."""
    from customshift_jax.parallel.sharding import parse_mesh

    if not args.sweep:
        return [dict(mesh=parse_mesh(args.mesh), rules=args.rules, remat=args.remat, attention=args.attention)]
    heads = config.num_attention_heads
    tensor = next(t for t in (8, 4, 2, 1) if heads % t == 0 and n_devices % (t * slices) == 0)
    meshes = [("dp", {"data": -1}), ("fsdp", {"data": slices, "fsdp": -1} if slices > 1 else {"fsdp": -1})]
    if tensor > 1:
        meshes.append(("fsdp_tp", {"data": slices, "fsdp": -1, "tensor": tensor} if slices > 1
                       else {"fsdp": -1, "tensor": tensor}))
    remats = ("none", "full") if args.task.startswith("train") else (args.remat,)
    return [dict(mesh=m, rules=r, remat=rm, attention=args.attention)
            for (r, m), rm in itertools.product(meshes, remats)]


def _row(r: dict[str, Any]) -> list[str]:
    from customshift_jax.plan.planner import GIB

    if "error" in r:
        return [r["rules"], r["mesh_text"], r["remat"], r["attention"], "-", "-", "-", "-", "-", r["error"][:60]]
    m, rf = r["memory"], r["roofline"]
    head = [r["rules"], ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1), r["remat"], r["attention"],
            f"{m['total'] / GIB:.2f}", "yes" if m["fits"] else "NO"]
    if rf is None:
        return head + ["-", "-", "-", "refused by XLA:TPU"]
    return head + [f"{rf['step_s'] * 1e3:.1f}", f"{rf['mfu_ceiling']:.0%}", f"{rf['items_per_s']:.3g}",
                   f"{(r['ici_bytes_per_device'] + r['dcn_bytes_per_device']) / GIB:.2f}"]


def sweep_table(reports: list[dict[str, Any]]) -> str:
    """One line per compiled candidate; the fastest bound that fits is marked with *."""
    from customshift_jax.plan.planner import best

    header = ["rules", "mesh", "remat", "attention", "GiB/dev", "fits", "step ms >=", "MFU <=", "items/s <=",
              "coll GiB/dev"]
    rows = [_row(r) for r in reports]
    top = best(reports)
    rows = [(["*"] if r is top else [" "]) + row for r, row in zip(reports, rows)]
    header = [" "] + header
    widths = [max(len(x[i]) for x in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header] + rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _check(args)
    config, name = model_config(args.model)
    from customshift_jax.plan.planner import knob_hint, plan, summary
    from customshift_jax.plan.pod import load_pod
    from customshift_jax.numerics import float_dtype
    from customshift_jax.plan.tasks import Workload

    pod = load_pod(args.topology, args.num_slices)
    batch = args.batch or len(pod.devices)
    reports = []
    for cand in sweep_candidates(args, config, len(pod.devices), args.num_slices):
        work = Workload(config, args.task, args.resolution, batch, dtype=float_dtype(args.dtype).name,
                        attention=cand["attention"], remat=cand["remat"], lora_rank=args.lora_rank,
                        text_length=args.text_length, steps=args.steps, guidance=not args.no_cfg)
        try:
            report = plan(pod, work, cand["mesh"], cand["rules"], model_name=name)
        except ValueError as e:
            if not args.sweep:
                raise
            report = {**cand, "mesh_text": ",".join(f"{k}={v}" for k, v in cand["mesh"].items()), "error": str(e)}
        reports.append(report)
        if not args.sweep:
            print(summary(report))
            if not report["memory"]["fits"]:
                print(f"error: does not fit: {report['memory']['total'] / 2**30:.2f} GiB per device needed, "
                      f"{report['hbm_bytes_per_device'] / 2**30:.2f} GiB available "
                      f"({-report['memory']['margin'] / 2**30:.2f} GiB over); try {knob_hint(report)}.",
                      file=sys.stderr)
        else:
            print(f"compiled {report.get('rules')} {report.get('mesh_text') or report.get('mesh')} remat "
                  f"{cand['remat']}: " + ("error" if "error" in report else f"{report['compile_seconds']:.0f} s"),
                  file=sys.stderr)
    if args.sweep:
        print(f"{args.task} of {name} at {args.resolution} px, global batch {batch}, {float_dtype(args.dtype).name} on "
              f"{pod.topology} x {pod.num_slices} ({pod.chips} chips, {pod.hosts} hosts); * = fastest bound that fits")
        print(sweep_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports if args.sweep else reports[0], indent=1, default=str) + "\n")
    fits = any(r.get("memory", {}).get("fits") for r in reports)
    return 0 if fits else 3
