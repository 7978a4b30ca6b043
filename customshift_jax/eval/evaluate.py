"""Score a folder of generated images: per-subject DINO, CLIP-I, CLIP-T, CLIPScore, and live / objects / all.

Rows come from bench-generate's manifest or another method's (CSV or JSONL: image path, subject, prompt). A
row whose image is missing or unreadable is skipped and counted in the output, never averaged as zero.
Aggregation: a subject's score is the mean over its images (and, for DINO / CLIP-I, over all its real photos);
live, objects and all are means over subjects, so every subject weighs the same.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.eval import metrics
from customshift_jax.eval.benchmarks import Benchmark
from customshift_jax.eval.plan import MANIFEST, read_jsonl

AGGREGATION = ("subject: mean over its images (DINO / CLIP-I: over all (generated, real photo) pairs); "
               "live / objects / all: mean over subjects")
METRICS = ("dino", "clip_i", "clip_t", "clipscore")


@dataclasses.dataclass(frozen=True)
class Row:
    """One image to score."""

    image: Path
    subject: str
    prompt: str
    seed: int | None = None
    reference: str | None = None


def read_manifest(path: str | Path, benchmark: Benchmark) -> tuple[list[Row], dict[str, Any] | None]:
    """(rows, bench-generate settings or None) from a .jsonl or .csv manifest; image paths relative to its folder.

    A row must name an image (`image` or `path`), a subject of the benchmark and a prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path}: no such file.")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            raw = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        raw = read_jsonl(path)
    else:
        raise ValueError(f"--manifest {path}: give a .csv or .jsonl file (columns image, subject, prompt).")
    rows = []
    for n, r in enumerate(raw, 1):
        image, subject, prompt = r.get("image") or r.get("path"), r.get("subject"), r.get("prompt")
        if not image or not subject or prompt is None:
            raise ValueError(f"manifest {path} row {n} lacks image (or path), subject or prompt.")
        try:
            benchmark.subject(subject)
        except ValueError as e:
            raise ValueError(f"manifest {path} row {n}: {e}") from None
        seed = r.get("seed")
        rows.append(Row(path.parent / image, subject, prompt, int(seed) if seed not in (None, "") else None,
                        r.get("reference") or None))
    if not rows:
        raise ValueError(f"manifest {path} lists no images.")
    settings = raw[0].get("settings") if isinstance(raw[0].get("settings"), dict) else None
    return rows, settings


def images_manifest(folder: str | Path) -> Path:
    """`--images DIR`: the manifest bench-generate wrote there."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"--images {folder}: no {MANIFEST}; give a folder written by `customshift "
                                "bench-generate`, or another method's images with --manifest FILE.csv|jsonl.")
    return path


def _config_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        if (path / name).is_file():
            h.update(json.dumps(json.loads((path / name).read_text()), sort_keys=True).encode())
    return h.hexdigest()[:16]


def protocol(benchmark: Benchmark, rows: Sequence[Row], dino: Any, clip: Any, settings: dict[str, Any] | None,
             reference_rule: str | None) -> dict[str, Any]:
    """What the numbers mean: models, preprocessing, aggregation, images per prompt, seeds, reference choice."""
    per_prompt: dict[tuple[str, str], int] = {}
    for r in rows:
        per_prompt[(r.subject, r.prompt)] = per_prompt.get((r.subject, r.prompt), 0) + 1
    counts = sorted(set(per_prompt.values()))
    seeds = sorted({r.seed for r in rows if r.seed is not None})
    rule = reference_rule or (settings or {}).get("reference_rule") or "unstated"
    return {
        "benchmark": benchmark.name,
        "subjects": len({r.subject for r in rows}),
        "prompts": len(per_prompt),
        "images_per_prompt": counts[0] if len(counts) == 1 else f"varies {counts[0]}..{counts[-1]}",
        "seeds": seeds if seeds else "unstated",
        "reference": rule,
        "real_images": "all photos of the subject",
        "dino": {"model_type": dino.model_type, "config": _config_digest(dino.path),
                 "embedding": dino.describe()["embedding"], "preprocessing": dino.describe()["preprocessing"]},
        "clip": {"model_type": clip.model_type, "config": _config_digest(clip.path),
                 "embedding": clip.describe()["embedding"], "preprocessing": clip.describe()["preprocessing"]},
        "clipscore_w": metrics.CLIPSCORE_W,
        "aggregation": AGGREGATION,
    }


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def score(benchmark: Benchmark, rows: Sequence[Row], dino: Any, clip: Any, cache: Any) -> dict[str, Any]:
    """{"subjects": {name: scores}, "groups": {live, objects, all}, "real": ..., "skipped": ...}."""
    paths = [r.image for r in rows]
    dino_gen, skipped = cache.images(dino, paths, "DINO generated")
    clip_gen, _ = cache.images(clip, [p for p in paths if p in dino_gen], "CLIP generated")
    skipped.update({p: "unreadable" for p in dino_gen if p not in clip_gen})
    names = list(dict.fromkeys(r.subject for r in rows))
    real_paths = [p for n in names for p in benchmark.subject(n).photos]
    dino_real, bad_real = cache.images(dino, real_paths, "DINO real")
    clip_real, _ = cache.images(clip, real_paths, "CLIP real")
    if bad_real:
        path, why = next(iter(bad_real.items()))
        raise ValueError(f"real photo {path} of the benchmark is {why}; the benchmark folder is damaged.")
    texts = cache.texts(clip, list(dict.fromkeys(r.prompt for r in rows)))
    subjects, real = {}, {}
    for name in names:
        s = benchmark.subject(name)
        mine = [r for r in rows if r.subject == name and r.image in clip_gen]
        rd = np.stack([dino_real[p] for p in s.photos])
        rc = np.stack([clip_real[p] for p in s.photos])
        real[name] = {"dino": metrics.mean_real_vs_real(rd), "clip_i": metrics.mean_real_vs_real(rc),
                      "photos": len(s.photos)}
        entry: dict[str, Any] = {"live": s.live, "images": len(mine),
                                 "skipped": sum(1 for r in rows if r.subject == name and r.image in skipped)}
        if mine:
            gd = np.stack([dino_gen[r.image] for r in mine])
            gc = np.stack([clip_gen[r.image] for r in mine])
            cos_t = metrics.text_image_cosines(np.stack([texts[r.prompt] for r in mine]), gc)
            entry.update(dino=metrics.mean_pairwise_cosine(gd, rd), clip_i=metrics.mean_pairwise_cosine(gc, rc),
                         clip_t=float(cos_t.mean()), clipscore=float(metrics.clipscore(cos_t).mean()))
        else:
            entry.update({m: None for m in METRICS})
        subjects[name] = entry
    groups = {}
    for group, keep in (("live", lambda e: e["live"]), ("objects", lambda e: not e["live"]), ("all", lambda e: True)):
        chosen = [e for e in subjects.values() if keep(e) and e["images"]]
        groups[group] = {"subjects": len(chosen), "images": sum(e["images"] for e in chosen),
                         **{m: _mean([e[m] for e in chosen]) for m in METRICS}}
    groups["real vs real"] = {"subjects": len(real), "images": sum(r["photos"] for r in real.values()),
                              "dino": _mean([r["dino"] for r in real.values()]),
                              "clip_i": _mean([r["clip_i"] for r in real.values()]), "clip_t": None,
                              "clipscore": None}
    reasons = sorted(set(skipped.values()))
    return {"subjects": subjects, "groups": groups, "real": real,
            "skipped": {"count": len(skipped), **{why: sorted(str(p) for p, w in skipped.items() if w == why)
                                                  for why in reasons}}}
