"""Write a scored result as JSON, CSV and a Markdown table, and compare two results whose protocols match."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from customshift_jax.eval.evaluate import METRICS
from customshift_jax.eval.plan import atomic_write_bytes
from customshift_jax.io.safe_files import read_regular_file

HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "clipscore": "CLIPScore"}
# Protocol entries that may differ between two compared tables: each method's own sampling seeds.
MAY_DIFFER = ("seeds",)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(result: dict[str, Any], label: str = "ours") -> str:
    """The overall table (live / objects / all / real vs real) and the per-subject one."""
    cols = " | ".join(HEADERS[m] for m in METRICS)
    lines = [f"| {label} | subjects | images | {cols} |", "| --- " * (3 + len(METRICS)) + "|"]
    for group, g in result["groups"].items():
        lines.append(f"| {group} | {g['subjects']} | {g['images']} | " + " | ".join(_fmt(g[m]) for m in METRICS) + " |")
    lines += ["", f"| subject | live | images | skipped | {cols} |", "| --- " * (4 + len(METRICS)) + "|"]
    for name, s in result["subjects"].items():
        lines.append(f"| {name} | {'yes' if s['live'] else 'no'} | {s['images']} | {s['skipped']} | "
                     + " | ".join(_fmt(s[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(result: dict[str, Any]) -> str:
    """One row per subject, then one per group."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "kind", "images", *METRICS])
    for name, s in result["subjects"].items():
        w.writerow([name, "live" if s["live"] else "object", s["images"], *("" if s[m] is None else s[m]
                                                                               for m in METRICS)])
    for group, g in result["groups"].items():
        w.writerow([group, "group", g["images"], *("" if g[m] is None else g[m] for m in METRICS)])
    return buf.getvalue()


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """`out/scores.json`, `out/scores.csv`, `out/scores.md` (atomically)."""
    paths = {"json": out / "scores.json", "csv": out / "scores.csv", "md": out / "scores.md"}
    atomic_write_bytes(paths["json"], json.dumps(result, indent=1, sort_keys=True).encode())
    atomic_write_bytes(paths["csv"], csv_text(result).encode())
    atomic_write_bytes(paths["md"], markdown(result).encode())
    return paths


def load_result(path: str | Path) -> dict[str, Any]:
    """A scores.json written by `customshift eval` (a file, or the folder holding it)."""
    path = Path(path)
    path = path / "scores.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"--compare {path}: no such file (give scores.json written by `customshift eval`).")
    try:
        result = json.loads(read_regular_file(path, 64 << 20, "--compare", "--compare").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare {path} is not JSON ({e}); give scores.json written by `customshift eval`.") from None
    if not isinstance(result, dict) or "protocol" not in result or "groups" not in result:
        raise ValueError(f"--compare {path} is not a `customshift eval` result (no protocol / groups).")
    return result


def compare(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("A", "B")) -> str:
    """A Markdown table of the two results' groups side by side; a ValueError when their protocols differ."""
    pa, pb = a["protocol"], b["protocol"]
    diff = sorted(k for k in set(pa) | set(pb) if k not in MAY_DIFFER and pa.get(k) != pb.get(k))
    if diff:
        detail = "; ".join(f"{k}: {pa.get(k)!r} vs {pb.get(k)!r}" for k in diff[:3])
        raise ValueError(f"the two results were scored under different protocols ({detail}); rescore one so that "
                         "they match.")
    cols = " | ".join(HEADERS[m] for m in METRICS)
    lines = [f"| method | group | {cols} |", "| --- " * (2 + len(METRICS)) + "|"]
    for label, r in zip(labels, (a, b)):
        for group, g in r["groups"].items():
            lines.append(f"| {label} | {group} | " + " | ".join(_fmt(g[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
