"""Rebuild every shipped artefact of the subject world from seeds, stage by stage, in a work folder:
the pipeline folder (random MMDiT and VAE, frozen text encoders), the trained VAE, the base MMDiT trained as a
text-to-image model, CustomShift and the token-competition baseline trained on pairs, the judge, the evaluation.

Each stage writes its own subfolder and is skipped when that is complete, so an interrupted build resumes.
`python -m customshift_jax.toyworld.build WORK [--ship]` (with --ship, copies the weights into the package).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

STAGES: list[tuple[str, Callable, bool]] = []
CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


def stage(name: str, *, resumable: bool = False) -> Callable:
    """Register a build stage; it runs only when WORK/<name>/.done is absent. A resumable stage (training)
    keeps what an interrupted run left and continues it; any other starts again in an empty folder."""
    def wrap(fn: Callable) -> Callable:
        STAGES.append((name, fn, resumable))
        return fn
    return wrap


@stage("pipeline")
def build_pipeline(work: Path, out: Path, args) -> None:
    """The diffusers SD3 pipeline folder of the world's shape, and its conversion to our checkpoint."""
    from customshift_jax.io.convert import convert
    from customshift_jax.toyworld.tiny_sd3 import build_world_pipeline

    build_world_pipeline(out / "diffusers", seed=args.seed)
    convert(out / "diffusers", out / "init", progress=False, log=lambda line: None)


@stage("vae")
def build_vae(work: Path, out: Path, args) -> None:
    """Train the VAE on renders; write a checkpoint holding the random MMDiT and the trained VAE."""
    from customshift_jax.io.checkpoint import load_checkpoint, save_checkpoint
    from customshift_jax.toyworld.vae_train import train_vae

    parts = load_checkpoint(work / "pipeline" / "init")
    vae_config, vae_params = train_vae(*parts["vae"], steps=args.vae_steps, batch=16, seed=args.seed)
    save_checkpoint(out / "model", {"transformer": parts["transformer"], "vae": (vae_config, vae_params)})


def write_pairs(folder: Path, n: int, seed: int, subjects: list) -> Path:
    """Render `n` pairs (same subject, two different contexts) as PNGs and write the manifest that
    `customshift prepare` reads: reference = context A, target = context B, caption of B, subject name."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from customshift_jax.toyworld import world

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc="render pairs", file=sys.stderr, mininterval=5):
        subject = subjects[int(rng.integers(len(subjects)))]
        a = world.random_context(rng)
        b = world.random_context(rng)
        while b == a:
            b = world.random_context(rng)
        ref, tgt = world.render(subject, a, 32, rng), world.render(subject, b, 32, rng)
        ref_path, tgt_path = folder / "images" / f"{i:06d}-ref.png", folder / "images" / f"{i:06d}-tgt.png"
        Image.fromarray(ref).save(ref_path)
        Image.fromarray(tgt).save(tgt_path)
        lines.append(json.dumps({"reference": str(ref_path.relative_to(folder)),
                                 "target": str(tgt_path.relative_to(folder)), "caption": world.caption(subject, b),
                                 "subject": subject.name}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def customshift_cli(*args) -> None:
    """Run `customshift ARGS...` as a user would (a subprocess of the real CLI); a failure stops the build."""
    import subprocess

    cmd = [sys.executable, "-m", "customshift_jax.cli.main", *map(str, args)]
    print("$ customshift " + " ".join(map(str, args)), file=sys.stderr)
    code = subprocess.call(cmd)
    if code:
        raise SystemExit(f"`customshift {args[0]}` failed with exit code {code}; fix it and rerun the build "
                         "(finished stages are kept).")


@stage("data")
def build_data(work: Path, out: Path, args) -> None:
    """Training pairs of training identities only, rendered and prepared (VAE latents, text embeddings)."""
    from customshift_jax.toyworld import world
    from customshift_jax.toyworld.tiny_sd3 import IMAGE_SIZE, T5_MAX_LENGTH

    train_subjects, _ = world.split_subjects(args.seed)
    manifest = write_pairs(out / "pairs", args.pairs, args.seed + 1, train_subjects)
    customshift_cli("prepare", manifest, out / "prepared", "--checkpoint", work / "vae" / "model",
                    "--text-encoders", work / "pipeline" / "diffusers", "--size", IMAGE_SIZE, "--no-flip",
                    "--batch-size", 64, "--shard-size", 4096, "--max-sequence-length", T5_MAX_LENGTH)
    shutil.rmtree(out / "pairs" / "images")  # the prepared shards hold everything training reads


def train_command(config: str, out: Path, *overrides: str) -> list[str]:
    """`customshift train --config train/configs/CONFIG ...` into `out`, resuming an interrupted run."""
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    return ["train", "--config", str(CONFIGS / config), f"output_dir={out}", *overrides,
            *(["--resume"] if resume else [])]


@stage("base", resumable=True)
def build_base(work: Path, out: Path, args) -> None:
    """The base MMDiT trained from scratch as text-to-image (every weight trains) on the pairs' targets."""
    customshift_cli(*train_command("world-base.yaml", out, f"model.checkpoint={work / 'vae' / 'model'}",
                                   f"data.path={work / 'data' / 'prepared'}", *args.base))


@stage("judge")
def build_judge(work: Path, out: Path, args) -> None:
    """The judge, trained on ground-truth renders of training identities."""
    from customshift_jax.toyworld import judge as J

    config, params = J.train_judge(steps=args.judge_steps, seed=args.seed)
    J.save_judge(out / "judge.npz", config, params)


@stage("loras", resumable=True)
def build_loras(work: Path, out: Path, args) -> None:
    """CustomShift (both LoRAs and beta), the token-competition baseline (`shift="concat"`) and the
    OminiControl-style one (`shift="joint"`), with the same data, steps and rank (the baselines without reference
    dropout, which works through the gamma they ignore), on the trained base, side by side: small XLA programs
    share 2 cores better than one uses them."""
    import subprocess

    common = [f"model.checkpoint={work / 'base' / 'model'}", f"data.path={work / 'data' / 'prepared'}", *args.lora]
    runs = {"customshift": train_command("world-customshift.yaml", out / "customshift", *common),
            **{shift: train_command("world-customshift.yaml", out / shift, *common, f"train.shift={shift}",
                                    "train.ref_dropout=0", "log.progress=false") for shift in ("concat", "joint")}}
    procs = {}
    for name, cmd in runs.items():
        print("$ customshift " + " ".join(cmd), file=sys.stderr)
        procs[name] = subprocess.Popen([sys.executable, "-m", "customshift_jax.cli.main", *cmd])
    failed = [name for name, p in procs.items() if p.wait() != 0]
    if failed:
        raise SystemExit(f"the {', '.join(failed)} training failed; fix it and rerun the build (finished stages "
                         "and the runs' checkpoints are kept).")


@stage("weights")
def build_weights(work: Path, out: Path, args) -> None:
    """Assemble what ships: model/ (our checkpoint, with the text encoders and the scheduler beside it, so that
    `customshift generate --checkpoint model/` runs), customshift/ and concat/ (LoRA files), judge.npz."""
    from customshift_jax.toyworld.methods import SCHEDULER_SHIFT

    shutil.copytree(work / "base" / "model", out / "model")
    pipeline = work / "pipeline" / "diffusers"
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(pipeline / name, out / "model" / name)
    (out / "model" / "scheduler").mkdir()
    (out / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SCHEDULER_SHIFT},
        indent=2) + "\n")
    for name in ("customshift", "concat", "joint"):
        shutil.copytree(work / "loras" / name / "lora", out / name)
    shutil.copy2(work / "judge" / "judge.npz", out / "judge.npz")


@stage("eval")
def build_eval(work: Path, out: Path, args) -> None:
    """The table and the plot: held-out subjects x contexts, every method, the judge's reading."""
    from customshift_jax.toyworld import evaluate as E
    from customshift_jax.toyworld import figures
    from customshift_jax.toyworld import judge as J
    from customshift_jax.toyworld.methods import STEPS, Generator, WorldModel

    weights = work / "weights"
    model = WorldModel.load(weights)
    cases = E.draw_cases(args.eval_seed, args.eval_subjects, args.eval_contexts)
    judge = J.load_judge(weights / "judge.npz")
    generator = Generator(model, guidance=args.guidance)
    rows, images = E.evaluate(model, generator, judge, cases, E.GAMMAS)
    judged = E.judge_report(judge, model)
    E.write_json(out / "scores.json", {"seed": args.eval_seed, "subjects": args.eval_subjects,
                                       "contexts_per_subject": args.eval_contexts, "steps": STEPS,
                                       "guidance": args.guidance, "judge": judged, "table": rows})
    table = E.markdown_table(rows)
    (out / "judge.md").write_text(E.judge_table(judged) + "\n")
    (out / "table.md").write_text(table + "\n")
    figures.tradeoff_plot({k: (r["context_all"], r["identity_cosine"]) for k, r in rows.items()}, out / "tradeoff.png",
                          ylabel="subject consistency (identity cosine to the reference)")
    shown = list(range(0, len(cases), args.eval_contexts))[:8]  # one context of each of 8 subjects
    refs, columns = E.references(cases), E.method_columns(E.GAMMAS, model.methods())
    figures.grid([[refs[i]] + [images[label][i] for label, _, _ in columns] for i in shown],
                 ["reference"] + [label for label, _, _ in columns],
                 [E.case_label(cases[i]) for i in shown], out / "grid.png")
    print(table)


def ship(work: Path) -> None:
    """Copy the assembled weights into the package and the evaluation into docs/ (README shows them)."""
    from customshift_jax.toyworld.methods import WEIGHTS

    staging = WEIGHTS.with_name(".weights.new")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(work / "weights", staging, ignore=shutil.ignore_patterns(".done"))
    if WEIGHTS.exists():
        shutil.rmtree(WEIGHTS)
    staging.rename(WEIGHTS)
    docs = Path(__file__).resolve().parents[2] / "docs" / "world"
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("scores.json", "table.md", "judge.md", "tradeoff.png", "grid.png"):
        shutil.copy2(work / "eval" / name, docs / name)
    print(f"shipped {WEIGHTS} and {docs}", file=sys.stderr)


def _lock(work: Path):
    """An exclusive lock on WORK/.lock: a second build of the same folder would delete the first one's stages."""
    import fcntl

    f = open(work / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another build is running in {work}; wait for it or use another folder.") from None
    return f


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m customshift_jax.toyworld.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="work folder (created; an existing one resumes the build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--until", default=None, help="stop after this stage")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--pairs", type=int, default=30000, help="training pairs rendered (default 30000)")
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--eval-subjects", type=int, default=64)
    parser.add_argument("--eval-contexts", type=int, default=4, help="target contexts per held-out subject")
    parser.add_argument("--guidance", type=float, default=None,
                        help="the evaluation's CFG scale (default: the world's, methods.GUIDANCE)")
    parser.add_argument("--ship", action="store_true", help="copy the weights into the package at the end")
    parser.add_argument("--base", nargs="*", default=[], help="extra key=value overrides of the base training")
    parser.add_argument("--lora", nargs="*", default=[], help="extra key=value overrides of both LoRA trainings")
    args = parser.parse_args(argv)
    if args.guidance is None:
        from customshift_jax.toyworld.methods import GUIDANCE

        args.guidance = GUIDANCE
    args.work.mkdir(parents=True, exist_ok=True)
    lock = _lock(args.work)  # noqa: F841 (held until the process exits)
    for name, fn, resumable in STAGES:
        out = args.work / name
        if (out / ".done").is_file():
            print(f"[{name}] done before; skipped", file=sys.stderr)
        else:
            if out.exists() and not resumable:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            print(f"[{name}] ...", file=sys.stderr)
            fn(args.work, out, args)
            seconds = time.time() - t0
            (out / ".done").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
            print(f"[{name}] {seconds:.0f} s", file=sys.stderr)
        if name == args.until:
            return 0
    if args.ship:
        ship(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
