"""How far a base training run has got: the world's text-only scores of each checkpoint's EMA weights.

`python -m customshift_jax.toyworld.base_probe WORK/base --guidance 1,3` reads every checkpoint of the run (or
`--steps`), samples the evaluation's held-out cases from text alone with the run's EMA weights (the VAE, text
encoders and judge of `--weights`) at each CFG scale, and prints one Markdown row per (step, scale): the judge's
silhouette and context factors. It measured what limited the third build's base (docs/world.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from customshift_jax.io.train_state import read_train_state, train_steps
from customshift_jax.sampling.sampler import noise_for
from customshift_jax.toyworld import evaluate as E
from customshift_jax.toyworld import judge as J
from customshift_jax.toyworld.methods import WEIGHTS, Generator, WorldModel
from customshift_jax.toyworld.tiny_sd3 import LATENT_SHAPE

KEYS = ("silhouette", "scene", "position", "size")


def probe(run: Path, steps: Sequence[int], guidances: Sequence[float], *, weights: Path = WEIGHTS,
          subjects: int = 64, contexts: int = 4, seed: int = 1234) -> list[dict]:
    """One row per (step, guidance): the text-only scores of that checkpoint's EMA (else trained) weights."""
    model = WorldModel.load(weights)
    judge = J.load_judge(weights / "judge.npz")
    cases = E.draw_cases(seed, subjects, contexts)
    refs = E.references(cases)
    prompt = model.encode_text([c.prompt for c in cases])
    noise = jnp.asarray(noise_for([jax.random.key(c.seed) for c in cases], LATENT_SHAPE))
    generators = {g: Generator(model, guidance=g) for g in guidances}  # built once; they read model.params per run
    rows = []
    for step in steps:
        _, state = read_train_state(run / "checkpoints", step)
        params = state.get("ema") or state["trainable"]
        if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(model.params):
            raise ValueError(f"{run}: the run's MMDiT is not the world model's of {weights}.")
        model.params = jax.tree_util.tree_map(jnp.asarray, params)
        for g, generator in generators.items():
            scores = E.score_images(judge, generator.run("text only", noise, prompt), cases, refs)
            rows.append({"step": step, "guidance": g, **{k: scores[k] for k in KEYS}})
            print(f"| {step} | {g:g} | " + " | ".join(f"{scores[k]:.3f}" for k in KEYS) + " |", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m customshift_jax.toyworld.base_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a `train.mode=base` run's output_dir (holding checkpoints/)")
    ap.add_argument("--steps", help="checkpoint steps, comma-separated (default: every one)")
    ap.add_argument("--guidance", default="1,3", help="CFG scales, comma-separated (default 1,3)")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="VAE, text encoders and judge (default: shipped)")
    ap.add_argument("--subjects", type=int, default=64)
    ap.add_argument("--contexts", type=int, default=4)
    args = ap.parse_args(argv)
    if not (args.run / "checkpoints").is_dir():
        print(f"error: {args.run}/checkpoints: no such folder; give a base run's output_dir.", file=sys.stderr)
        return 2
    steps = [int(s) for s in args.steps.split(",")] if args.steps else train_steps(args.run / "checkpoints")
    print("| step | CFG | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    probe(args.run, steps, [float(g) for g in args.guidance.split(",")], weights=args.weights,
          subjects=args.subjects, contexts=args.contexts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
