"""The generation plan: one row per image (`DIR/<subject>/<prompt index>_<seed>.png`), its manifest, shards.

The manifest (`DIR/manifest.jsonl`) lists every planned image with its subject, prompt, reference, seed and the
run's settings; it is the same on every process, and an image counts as done when its PNG exists (PNGs are
written atomically, so a stopped run leaves no partial file). Reference rule: "first" is each subject's first
photo in sorted file-name order; "cycle" gives the k-th image of every prompt photo k mod (number of photos).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from customshift_jax.eval.benchmarks import Benchmark
from customshift_jax.io.safe_files import atomic_write

MANIFEST = "manifest.jsonl"
REFERENCE_RULES = ("first", "cycle")


@dataclasses.dataclass(frozen=True)
class PlanItem:
    """One image to generate: where it goes and what makes it."""

    image: str  # relative to the output folder: <subject>/<prompt index>_<seed>.png
    subject: str
    class_word: str
    prompt: str
    prompt_index: int
    seed: int
    reference: str


def reference_for(photos: Sequence[Path], rule: str, k: int) -> Path:
    """The reference photo of a subject's k-th image per prompt under `rule`."""
    if rule not in REFERENCE_RULES:
        raise ValueError(f"--reference-rule {rule!r} is not known; give one of {', '.join(REFERENCE_RULES)}.")
    if not photos:
        raise ValueError("a subject has no photos to take a reference from.")
    return photos[0] if rule == "first" else photos[k % len(photos)]


def select(benchmark: Benchmark, subjects: Sequence[str] | None = None, max_prompts: int | None = None) -> Benchmark:
    """A benchmark cut to some subjects (by name, in the given order) and its first `max_prompts` prompts each."""
    chosen = benchmark.subjects if not subjects else tuple(benchmark.subject(n) for n in subjects)
    if max_prompts is not None:
        if max_prompts < 1:
            raise ValueError(f"--max-prompts {max_prompts}: give at least 1.")
        chosen = tuple(dataclasses.replace(s, prompts=s.prompts[:max_prompts]) for s in chosen)
    return dataclasses.replace(benchmark, subjects=chosen)


def make_plan(benchmark: Benchmark, *, images_per_prompt: int, seed: int, reference_rule: str) -> list[PlanItem]:
    """Every image of the benchmark: subjects x prompts x seeds seed .. seed + images_per_prompt - 1."""
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt {images_per_prompt}: give at least 1.")
    items = []
    for s in benchmark.subjects:
        for p, prompt in enumerate(s.prompts):
            for k in range(images_per_prompt):
                ref = reference_for(s.photos, reference_rule, k)
                items.append(PlanItem(f"{s.name}/{p:02d}_{seed + k}.png", s.name, s.class_word, prompt, p, seed + k,
                                      str(ref)))
    return items


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard i/n` -> (i, n) with 0 <= i < n; None when not given."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: give i/n, e.g. 0/4 (shard i of n, counted from 0).") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in 0 .. n-1 (n = {n}).")
    return i, n


def shard_items(items: Sequence[PlanItem], shard: tuple[int, int] | None) -> list[PlanItem]:
    """Shard i of n: whole subjects, every n-th from the i-th (one prefill per subject stays on one process)."""
    if shard is None:
        return list(items)
    i, n = shard
    names = list(dict.fromkeys(item.subject for item in items))
    mine = set(names[i::n])
    return [item for item in items if item.subject in mine]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to an exclusive temp file beside `path`, then rename: readers and resumed runs never see a partial
    file, and a symlink planted at `path` is refused (io.safe_files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)


def manifest_rows(items: Iterable[PlanItem], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's rows: each item's fields and the run's settings."""
    return [{**dataclasses.asdict(item), "settings": settings} for item in items]


def write_manifest(out: Path, items: Sequence[PlanItem], settings: dict[str, Any]) -> Path:
    """`out/manifest.jsonl` for the whole plan; refused when one already there was made with other settings."""
    path = out / MANIFEST
    rows = manifest_rows(items, settings)
    if path.is_file():
        old = read_jsonl(path)
        if old and old[0].get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(old[0].get("settings", {}))
                          if settings.get(k) != old[0].get("settings", {}).get(k))
            raise ValueError(f"--out {out} holds images made with other settings ({', '.join(diff)} differ); "
                             "resume with the same flags, or give another --out folder.")
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one a line (blank lines skipped); a bad line is named."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} line {n} is not JSON ({e.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"manifest {path} line {n} is not a JSON object.")
        rows.append(row)
    return rows
