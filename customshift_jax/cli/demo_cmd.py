"""See CustomShift keep a subject's identity, on the procedural subject world (DESIGN section 8), with the tiny
SD3, LoRAs and judge that ship in the package (trained here; nothing is downloaded).

Draws N held-out subjects (identities no training run saw) and a context for each from --seed, renders each
subject's reference in another context, and generates the target prompt with every method: the base model from
text only, the training-free concatenation, the trained token-competition baseline, and CustomShift at each
gamma. Writes DIR/grid.png (rows: subjects; columns: reference, then the methods), one PNG per image under
DIR/images/, DIR/subjects.json (factors, colours, and per image its file, method, gamma and context) and
DIR/scores.json (the judge's table), and prints the table.

Example:
  customshift demo --seed 0 --subjects 6 --gammas 0.5,1,2 --out demo/
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
    p.add_argument("--subjects", type=int, default=6, help="held-out subjects, one grid row each (default 6)")
    p.add_argument("--gammas", default="0.25,0.5,1,2,4",
                   help="CustomShift reference strengths, comma-separated (default 0.25,0.5,1,2,4)")
    p.add_argument("--out", default="demo", help="output folder (created; default ./demo)")
    p.add_argument("--weights", default=None, help="a world weights folder (default: the shipped one)")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if absent).")


def run(args: argparse.Namespace) -> int:
    gammas = parse_gammas(args.gammas)
    if args.subjects < 1:
        raise ValueError(f"--subjects {args.subjects}: give at least 1.")
    out = Path(args.out)
    _check_out(out)
    from customshift_jax.toyworld.demo import run_demo

    t0 = time.time()
    table = run_demo(out, seed=args.seed, n_subjects=args.subjects, gammas=gammas, weights=args.weights)
    print(table)
    print(f"wrote {out / 'grid.png'}, {out / 'scores.json'}, {out / 'subjects.json'} ({time.time() - t0:.0f} s)")
    return 0
