"""Score generated images on DreamBench or CustomConcept101: DINO, CLIP-I, CLIP-T and CLIPScore.

Examples:
  customshift eval --data dreambooth/dataset --images bench/ours --dino dino-vits16/ --clip clip-vit-b-32/
  customshift eval --data dreambench/ --manifest uno/images.csv --reference-rule first --dino ... --clip ... --out uno/
  customshift eval --compare bench/ours/scores.json uno/scores.json

--images DIR reads the manifest `customshift bench-generate` wrote; --manifest FILE.csv|jsonl scores another
method's images (columns image or path, subject, prompt; optional seed, reference; paths relative to the file).
DINO: ViT-S/16 CLS token, resize 256 bicubic, centre crop 224, ImageNet normalisation; CLIP: the folder's
processor. DINO and CLIP-I: mean cosine over (generated, real photo) pairs of a subject; CLIP-T: prompt-image
cosine; CLIPScore: 2.5 x max(cos, 0). Writes scores.json (with the protocol), scores.csv and scores.md;
embeddings are cached, so a rerun scores only new images. --compare refuses results of different protocols.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "score generated images on DreamBench / CustomConcept101 (DINO, CLIP-I, CLIP-T, CLIPScore)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from customshift_jax.eval.benchmarks import BENCHMARKS
    from customshift_jax.eval.plan import REFERENCE_RULES

    p.add_argument("--benchmark", choices=BENCHMARKS, default="dreambench", help="which benchmark")
    p.add_argument("--data", help="the benchmark's local folder (its real photos and prompts)")
    p.add_argument("--images", help="a folder written by `customshift bench-generate` (its manifest.jsonl)")
    p.add_argument("--manifest", help="another method's images: a .csv or .jsonl of image, subject, prompt")
    p.add_argument("--dino", help="local transformers folder of DINO ViT-S/16 (ViTModel)")
    p.add_argument("--clip", help="local transformers folder of a CLIPModel (ViT-B/32 in the papers)")
    p.add_argument("--out", help="where scores.json/.csv/.md go (default: the --images folder or the manifest's)")
    p.add_argument("--reference-rule", choices=(*REFERENCE_RULES, "unstated"),
                   help="the reference choice behind a --manifest's images, recorded in the protocol")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "customshift" / "eval"),
                   help="folder of cached embeddings")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--backend", choices=("jax", "torch"), default="jax", help="where the image towers run (the text "
                   "tower runs in PyTorch); both give the same embeddings to ~1e-6")
    p.add_argument("--compare", nargs=2, metavar="SCORES", help="print two results side by side (same protocol)")


def run(args: argparse.Namespace) -> int:
    from customshift_jax.eval import report

    if args.compare:
        a, b = (report.load_result(p) for p in args.compare)
        print(report.compare(a, b, labels=tuple(args.compare)), end="")
        return 0
    missing = [f for f, v in (("--data", args.data), ("--dino", args.dino), ("--clip", args.clip)) if not v]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --compare A.json B.json).")
    if (args.images is None) == (args.manifest is None):
        raise ValueError("give exactly one of --images DIR (bench-generate's folder) or --manifest FILE.csv|jsonl.")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1.")

    from customshift_jax.eval.benchmarks import load_benchmark
    from customshift_jax.eval.cache import EmbeddingCache
    from customshift_jax.eval.encoders import ClipEncoder, DinoEncoder
    from customshift_jax.eval.evaluate import images_manifest, protocol, read_manifest, score

    bench = load_benchmark(args.benchmark, args.data)
    manifest = images_manifest(args.images) if args.images else Path(args.manifest)
    rows, settings = read_manifest(manifest, bench)
    if settings and settings.get("benchmark") not in (None, bench.name):
        raise ValueError(f"{manifest} was generated for {settings['benchmark']}, not --benchmark {bench.name}.")
    dino = DinoEncoder(args.dino, args.batch_size, args.backend)
    clip = ClipEncoder(args.clip, args.batch_size, args.backend)
    cache = EmbeddingCache(args.cache)
    result = score(bench, rows, dino, clip, cache)
    if not result["groups"]["all"]["images"]:
        raise ValueError(f"none of the {len(rows)} images of {manifest} could be read (missing or unreadable).")
    result["protocol"] = protocol(bench, rows, dino, clip, settings, args.reference_rule)
    result["models"] = {"dino": dino.describe(), "clip": clip.describe()}
    result["manifest"] = str(manifest)
    result["generation"] = settings
    out = Path(args.out) if args.out else manifest.parent
    paths = report.write_outputs(result, out)
    print(report.markdown(result), end="")
    skipped = result["skipped"]
    if skipped["count"]:
        kinds = ", ".join(f"{len(v)} {k}" for k, v in skipped.items() if k != "count")
        print(f"warning: {skipped['count']} of {len(rows)} images skipped ({kinds}); not in the means, listed in "
              f"{paths['json']}", file=sys.stderr)
    print(f"scores -> {paths['json']}, {paths['csv']}, {paths['md']} (embeddings: {cache.hits} cached, "
          f"{cache.misses} computed)")
    return 0
