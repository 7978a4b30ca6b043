"""Compare our JAX MMDiT with diffusers' SD3Transformer2DModel on the same weights and random inputs.

With no --torch, each tiny preset is built in diffusers with random weights, mapped, and both forwards
run (fp32, highest matmul precision). With --torch DIR, the same for a diffusers transformer folder
or pipeline folder on disk. Exit status 0 only when every row passes (relative error <= 1e-5).

With --customshift, CustomShift itself against its PyTorch reference (reference/torch_customshift.py), with
random non-zero LoRAs and beta (or --lora DIR): the RAB prefill's K/V per layer and the CGB forward
("cads" at each --gammas, "concat") within 1e-5, an N-step guided sample in diffusers'
FlowMatchEulerDiscreteScheduler loop within 1e-4, and with --grads the gradients of a rectified-flow loss
w.r.t. both LoRAs and beta within 1e-4 per leaf (DESIGN section 7).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from customshift_jax.crosscheck.mmdit import Row
    from customshift_jax.models.mmdit.config import MMDiTConfig

HELP = "check the JAX MMDiT (or, with --customshift, CustomShift) against PyTorch, number for number"
PRESETS = "tiny-sd3-medium,tiny-sd3.5-medium,tiny-sd3.5-large"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", metavar="DIR", help="a diffusers transformer folder (or pipeline folder) to check; "
                   "with --customshift, the transformer both sides run CustomShift on (default: the --presets, "
                   "built with random weights)")
    p.add_argument("--presets", default=PRESETS,
                   help=f"comma-separated presets to check when --torch is not given (default: {PRESETS})")
    p.add_argument("--height", type=int, default=12, help="latent height (default 12: non-square, below the "
                   "maximum position grid)")
    p.add_argument("--width", type=int, default=8, help="latent width (default 8)")
    p.add_argument("--batch", type=int, default=3, help="batch size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs, weights and LoRAs (default 0)")
    p.add_argument("--skip-layers", default="", help="comma-separated layer indices to skip, e.g. 1,2 (default: "
                   "none; with --customshift they apply to the CGB forward and gradient rows, not the sample)")
    p.add_argument("--per-block", action="store_true", help="also compare the output of every block (default off; "
                   "with --customshift, for every CGB forward row)")
    p.add_argument("--json", metavar="FILE", help="also write every row (name, quantity, shape, max abs error, "
                   "rel error, tolerance, pass) to FILE as JSON, for CI (default: no file)")
    g = p.add_argument_group("CustomShift (--customshift)")
    g.add_argument("--customshift", action="store_true", help="check CustomShift's branches against the PyTorch "
                   "reference instead of the base MMDiT (default off)")
    g.add_argument("--lora", metavar="DIR", help="a folder of customshift_{cgb,rab,beta}.safetensors to use instead "
                   "of random LoRAs and beta (default: random, every factor non-zero)")
    g.add_argument("--no-verify", action="store_true", help="skip checking the --lora files' content hashes")
    g.add_argument("--lora-rank", type=int, default=4, help="rank of the random LoRAs (default 4; ignored with "
                   "--lora)")
    g.add_argument("--lora-alpha", type=float, default=8.0, help="alpha of the random LoRAs, scale alpha / rank "
                   "(default 8.0; ignored with --lora)")
    g.add_argument("--gammas", default="0.5,1,2", help="comma-separated gammas of the 'cads' forward rows "
                   "(default 0.5,1,2; 'concat' ignores gamma)")
    g.add_argument("--steps", type=int, default=4, help="sampling steps of the sample row (default 4)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale of the sample row "
                   "(default 5.0)")
    g.add_argument("--sample-gamma", type=float, default=1.5, help="gamma of the sample row (default 1.5)")
    g.add_argument("--grads", action="store_true", help="also compare the gradients of a rectified-flow loss "
                   "(gamma 1, prefill inside the loss) w.r.t. both LoRAs and beta, jax.grad vs torch autograd, one "
                   "row per branch and layer, bound 1e-4 per leaf (default off; slower: compiles the backward pass)")


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    _check_args(args)
    lora_files = _read_lora(args)  # a bad folder fails before any model is built
    jobs = _jobs(args)
    for _name, config, _model, _params in jobs:
        _check_size(config, args)
    rows = _run_customshift(args, jobs, lora_files) if args.customshift else _run_base(args, jobs)
    if args.json:
        from customshift_jax.crosscheck.mmdit import write_rows_json

        write_rows_json(args.json, rows)
    ok = all(r.passed for r in rows)
    other = "the PyTorch reference" if args.customshift else "diffusers"
    print("all passed" if ok else f"FAILED: JAX and {other} disagree beyond the tolerance")
    return 0 if ok else 1


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and CustomShift-only flags without --customshift, in one line each."""
    if args.height <= 0 or args.width <= 0 or args.batch <= 0:
        raise ValueError("--height, --width and --batch must be positive.")
    if not args.customshift:
        for flag, given in (("--grads", args.grads), ("--lora", args.lora is not None)):
            if given:
                raise ValueError(f"{flag} needs --customshift.")
        return
    if args.steps <= 0 or args.lora_rank <= 0:
        raise ValueError("--steps and --lora-rank must be positive.")
    _gammas(args.gammas)
    if args.sample_gamma < 0:
        raise ValueError(f"--sample-gamma must be >= 0, got {args.sample_gamma}.")


def _gammas(text: str) -> list[float]:
    """--gammas as floats; each must be >= 0 (0 removes the reference path)."""
    try:
        gammas = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--gammas must be comma-separated numbers, got {text!r}.") from None
    if not gammas or min(gammas) < 0:
        raise ValueError(f"--gammas must be one or more numbers >= 0, got {text!r}.")
    return gammas


def _skip(args: argparse.Namespace) -> list[int]:
    """--skip-layers as integers."""
    try:
        return [int(s) for s in args.skip_layers.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--skip-layers must be comma-separated integers, got {args.skip_layers!r}.") from None


def _jobs(args: argparse.Namespace) -> list[tuple[str, Any, Any, Any]]:
    """(name, config, torch model, JAX params or None) per model to check: the --torch folder, or the presets."""
    if args.torch:
        return [_load_torch(args.torch)]
    from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
    from customshift_jax.models.mmdit.config import get_preset

    jobs = []
    for name in [n.strip() for n in args.presets.split(",") if n.strip()]:
        config = get_preset(name)
        jobs.append((name, config, random_diffusers_transformer(config, args.seed), None))
    if not jobs:
        raise ValueError("--presets names no preset.")
    return jobs


def _load_torch(path: str) -> tuple[str, Any, Any, Any]:
    """A user's diffusers transformer: our params (every key validated first) and diffusers' model."""
    from customshift_jax.io.diffusers_folder import component_folder
    from customshift_jax.io.loading import load_transformer

    folder = component_folder(path, "transformer")
    config, params = load_transformer(folder)  # validates every key before torch loads anything
    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return str(folder), config, model, params


def _run_base(args: argparse.Namespace, jobs) -> list[Row]:
    """The base MMDiT forward (and per block) per model; prints its table."""
    from customshift_jax.crosscheck.mmdit import crosscheck_model

    header = f"{'model':<28} {'output shape':<20} {'max abs err':>12} {'rel err':>10} {'tol':>8}  result"
    print(header)
    print("-" * len(header))
    rows = []
    for name, config, model, params in jobs:
        r = crosscheck_model(name, config, model, batch=args.batch, height=args.height, width=args.width,
                             seed=args.seed, skip_layers=_skip(args), per_block=args.per_block, params=params)
        rows += r.rows()
        print(f"{name:<28} {str(r.shape):<20} {r.max_abs:>12.3e} {r.rel:>10.2e} {r.tolerance:>8.0e}  "
              f"{'PASS' if r.passed else 'FAIL'}")
        for i, ex, ec in r.per_block:
            text = "-" if ec is None else f"{ec:.2e}"
            print(f"    block {i:>3}: image stream rel err {ex:.2e}, text stream rel err {text}")
    return rows


def _read_lora(args: argparse.Namespace):
    """The --lora folder's `LoRAFiles`, checked, or None for random LoRAs."""
    if args.lora is None:
        return None
    from customshift_jax.io.lora_files import read_lora_files

    return read_lora_files(args.lora, verify=not args.no_verify, what="--lora")


def _run_customshift(args: argparse.Namespace, jobs, lora_files) -> list[Row]:
    """CustomShift's rows per model against the PyTorch reference; prints them as they come."""
    from customshift_jax.crosscheck.customshift import build_case, crosscheck_customshift

    print_header()
    rows = []
    for name, config, model, params in jobs:
        case = build_case(name, config, model, params=params, lora_files=lora_files, rank=args.lora_rank,
                          alpha=args.lora_alpha, batch=args.batch, height=args.height, width=args.width,
                          seed=args.seed, skip_layers=_skip(args))
        try:
            model_rows = crosscheck_customshift(case, gammas=_gammas(args.gammas), steps=args.steps,
                                                guidance=args.guidance, sample_gamma=args.sample_gamma,
                                                grads=args.grads, per_block=args.per_block)
        finally:
            case.close()
        print_rows(model_rows)
        rows += model_rows
    return rows


def print_header() -> None:
    """The column titles of the CustomShift table."""
    header = (f"{'model':<20} {'quantity':<52} {'shape':<16} {'max abs err':>11} {'rel err':>9} {'tol':>6}"
              "  result")
    print(header)
    print("-" * len(header))


def print_rows(rows: Sequence[Row]) -> None:
    """One line per row: model, quantity, shape, max abs error (- where not recorded), rel error, bound, verdict."""
    for r in rows:
        max_abs = f"{r.max_abs:.3e}" if r.max_abs == r.max_abs else "-"
        shape = str(r.shape) if r.shape else "-"
        print(f"{r.name:<20} {r.quantity:<52} {shape:<16} {max_abs:>11} {r.rel:>9.2e} {r.tolerance:>6.0e}  "
              f"{'PASS' if r.passed else 'FAIL'}")


def _check_size(config: MMDiTConfig, args: argparse.Namespace) -> None:
    """The latent size must be a multiple of the patch size and fit the position grid."""
    p, m = config.patch_size, config.pos_embed_max_size
    if args.height % p or args.width % p:
        raise ValueError(f"--height and --width must be multiples of the patch size {p}.")
    if not config.latent_fits(args.height, args.width):
        raise ValueError(f"--height/--width give a {args.height // p}x{args.width // p} grid, over "
                         f"pos_embed_max_size {m}.")
