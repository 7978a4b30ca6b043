"""Generate a benchmark's whole image set with CustomShift: DreamBench (30 subjects x 25 prompts) or CustomConcept101.

Examples:
  customshift bench-generate --data dreambooth/dataset --checkpoint ckpt/ --lora lora/ --out bench/ours
  customshift bench-generate --data dreambench/ --checkpoint ckpt/ --out bench/ours --shard 0/4   # on host 0 of 4
  customshift bench-generate --benchmark customconcept101 --data CustomConcept101/ --checkpoint ckpt/ --out cc/

Images go to OUT/<subject>/<prompt index>_<seed>.png, listed in OUT/manifest.jsonl (subject, prompt, reference,
seed, settings); seeds are --seed .. --seed + images per prompt - 1, and the image at seed S is the one
`customshift generate --seed S` gives. The subject name is the class word ("dog"); the reference is the
subject's first photo in sorted order (--reference-rule first) or its photos in turn (cycle). Rerunning the
same command resumes: images already there are skipped. With several JAX processes each takes one shard.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate a benchmark's image set (DreamBench, CustomConcept101), resumable and sharded"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from customshift_jax.eval.benchmarks import BENCHMARKS
    from customshift_jax.eval.plan import REFERENCE_RULES

    p.add_argument("--benchmark", choices=BENCHMARKS, default="dreambench", help="which benchmark")
    p.add_argument("--data", required=True, help="the benchmark's local folder (DreamBench: prompts_and_classes.txt "
                   "and one folder per subject)")
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory or a diffusers pipeline folder")
    p.add_argument("--text-encoders", help="a diffusers pipeline folder holding the text encoders")
    p.add_argument("--lora", help="CustomShift LoRA folder (as `customshift generate --lora`)")
    p.add_argument("--out", required=True, help="output folder (created; rerun with the same flags to resume)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (DreamBench's protocol: 4)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image k of a prompt has seed --seed + k")
    p.add_argument("--reference-rule", choices=REFERENCE_RULES, default="first",
                   help="first: each subject's first photo (sorted names); cycle: image k takes photo k mod count")
    p.add_argument("--subjects", help="comma-separated subject names (default: all)")
    p.add_argument("--max-prompts", type=int, help="only the first N prompts of each subject (a quick run)")
    p.add_argument("--shard", help="i/n: generate shard i of n (whole subjects); default one per JAX process")
    p.add_argument("--limit", type=int, help="stop after writing this many images (rerun to go on)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--gamma", type=float, default=1.0, help="CustomShift's reference strength")
    p.add_argument("--shift", choices=["cads", "concat", "joint"], default="cads",
                   help="cads (the shift), concat or joint (the baselines; see `customshift generate --help`)")
    p.add_argument("--height", type=int, help="image height in px (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width in px (default: the model's native size)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: what the checkpoint or "
                   "--lora records it was trained with, else 256)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--text-cache", default=str(Path.home() / ".cache" / "customshift" / "text"),
                   help="folder of cached prompt embeddings")
    p.add_argument("--text-backend", choices=("auto", "torch", "jax"), default="auto",
                   help="text encoders in PyTorch on the host or in JAX (auto: jax when our checkpoint holds them)")


def _settings(args: argparse.Namespace, height: int, width: int) -> dict:
    """What the manifest records and a resumed run must repeat."""
    keys = ("benchmark", "data", "checkpoint", "lora", "images_per_prompt", "seed", "reference_rule", "subjects",
            "max_prompts", "steps", "guidance", "gamma", "shift", "max_sequence_length", "negative_prompt")
    return {**{k: getattr(args, k) for k in keys}, "height": height, "width": width}


def run(args: argparse.Namespace) -> int:
    from customshift_jax.cli.generate_cmd import check_gamma, check_seed
    from customshift_jax.eval.benchmarks import load_benchmark
    from customshift_jax.eval.plan import make_plan, parse_shard, select, shard_items, write_manifest

    if args.steps < 1:
        raise ValueError("--steps must be at least 1.")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit {args.limit}: give 0 or more images.")
    check_seed(args.seed)
    check_seed(args.seed + max(args.images_per_prompt, 1) - 1)
    check_gamma(args.gamma)
    shard = parse_shard(args.shard)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder.")
    names = [n.strip() for n in args.subjects.split(",") if n.strip()] if args.subjects else None
    bench = select(load_benchmark(args.benchmark, args.data), names, args.max_prompts)
    items = make_plan(bench, images_per_prompt=args.images_per_prompt, seed=args.seed,
                      reference_rule=args.reference_rule)

    import jax

    from customshift_jax.customshift_pipeline import CustomShiftPipeline
    from customshift_jax.io.lora_files import read_lora_files
    from customshift_jax.eval.generate import SampleSettings, generate_plan
    from customshift_jax.io.text_settings import stderr_note
    from customshift_jax.pipeline import check_size

    lora = read_lora_files(args.lora, what="--lora") if args.lora else None  # damaged: fails before the weights load
    if shard is None and jax.process_count() > 1:
        shard = (jax.process_index(), jax.process_count())
    pipe = CustomShiftPipeline.from_pretrained(args.checkpoint, lora=lora, text_backend=args.text_backend,
                                               text_encoders=args.text_encoders, text_cache=args.text_cache,
                                               shift=args.shift, progress=False, notes=stderr_note)
    args.max_sequence_length = pipe.max_sequence_length(args.max_sequence_length, "--max-sequence-length")
    config, scale = pipe.config, pipe.vae_scale
    height, width = args.height or config.sample_size * scale, args.width or config.sample_size * scale
    check_size(config, scale, height, width)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, items, _settings(args, height, width))
    mine = shard_items(items, shard)
    if pipe.text_folder is None:
        raise ValueError(f"{args.checkpoint} has no text encoders: pass --text-encoders PIPELINE_FOLDER.")
    settings = SampleSettings(args.steps, args.guidance, args.gamma, height, width, args.max_sequence_length,
                              args.negative_prompt)
    stats = generate_plan(mine, out, pipe=pipe, settings=settings, limit=args.limit,
                          extra_meta={"checkpoint": str(args.checkpoint), "lora": args.lora, "shift": args.shift})
    part = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"{len(mine)} images{part}: {stats.present} already there, {stats.written} written, {stats.left} left"
          f"{' (--limit reached; rerun to go on)' if stats.left else ''}; manifest {out / 'manifest.jsonl'}")
    return 0
