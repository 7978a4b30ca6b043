"""See CustomShift keep a subject's identity, on the procedural subject world (DESIGN section 8), with the tiny
SD3, LoRAs and judge that ship in the package (trained here; nothing is downloaded).

Draws N held-out subjects (identities no training run saw) and a context for each from --seed, renders each
subject's reference in another context, and generates the target prompt with every method: the base model from
text only, the training-free concatenation, the trained token-competition baseline, and CustomShift at each
gamma. Writes DIR/grid.png (rows: subjects; columns: reference, then the methods), one PNG per image under
DIR/images/, DIR/subjects.json (factors, colours, and per image its file, method, gamma and context) and
DIR/scores.json (the judge's table), and prints the table with each figure's standard error and a legend.

DIR is --out, or ./demo (./demo-2, ./demo-3, ... when it already holds a demo). A given --out that already holds
a demo is refused: one run's images never sit beside another's.

Example:
  customshift demo --seed 0 --subjects 24 --gammas 0.5,1,2 --out demo-seed0/
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "generate held-out subjects of the toy world with every method; write a grid and the judge's table"


def parse_gammas(text: str) -> tuple[float, ...]:
    """"0.5,1,2" -> (0.5, 1.0, 2.0); a bad value is a one-line error naming the flag."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--gammas {text!r}: expected comma-separated numbers, e.g. --gammas 0.5,1,2.") from None
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise ValueError(f"--gammas {text!r}: expected one or more finite numbers >= 0, e.g. --gammas 0.5,1,2.")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="draws the subjects, contexts and noise (default 0)")
    p.add_argument("--subjects", type=int, default=24,
                   help="held-out subjects, one grid row each; the table's shares move in steps of 1/N (default 24)")
    p.add_argument("--gammas", default="0.25,0.5,1,2,4",
                   help="CustomShift reference strengths, comma-separated (default 0.25,0.5,1,2,4)")
    p.add_argument("--out", default=None, help="output folder, created; refused if it already holds a demo "
                   "(default: ./demo, or ./demo-2, ./demo-3, ... when that holds one)")
    p.add_argument("--weights", default=None, help="a world weights folder (default: the shipped one)")


DEMO_FILES = ("grid.png", "images", "scores.json", "subjects.json")


def holds_demo(folder: Path) -> bool:
    """Whether `folder` already holds (part of) a demo's output."""
    return folder.is_dir() and any((folder / name).exists() for name in DEMO_FILES)


def output_folder(out: str | None, cwd: Path | None = None) -> Path:
    """--out as given (refused when a file or when it holds a demo), or the first of ./demo, ./demo-2, ... that
    holds none."""
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder (it is created if absent).")
        if holds_demo(folder):
            found = ", ".join(n for n in DEMO_FILES if (folder / n).exists())
            raise ValueError(f"--out {out} already holds a demo ({found}); give a new folder, or remove that one "
                             "first.")
        return folder
    cwd = cwd or Path.cwd()
    for i in range(1, 10000):
        folder = cwd / ("demo" if i == 1 else f"demo-{i}")
        if not folder.exists() or (folder.is_dir() and not holds_demo(folder)):
            return folder
    raise ValueError("./demo, ./demo-2, ... ./demo-9999 all hold a demo; give --out FOLDER.")


def run(args: argparse.Namespace) -> int:
    gammas = parse_gammas(args.gammas)
    if args.subjects < 1:
        raise ValueError(f"--subjects {args.subjects}: give at least 1.")
    out = output_folder(args.out)  # before anything loads: a bad --out fails at once
    from customshift_jax.toyworld.demo import run_demo

    t0 = time.time()
    table = run_demo(out, seed=args.seed, n_subjects=args.subjects, gammas=gammas, weights=args.weights)
    print(table)
    print(f"wrote {out / 'grid.png'}, {out / 'scores.json'}, {out / 'subjects.json'} ({time.time() - t0:.0f} s)")
    return 0
