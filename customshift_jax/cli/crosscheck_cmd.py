"""Compare our JAX MMDiT with diffusers' SD3Transformer2DModel on the same weights and random inputs.

With no --torch, each tiny preset is built in diffusers with random weights, mapped, and both forwards
run (fp32, highest matmul precision). With --torch DIR, the same for a diffusers transformer folder
or pipeline folder on disk. Exit status 0 only when every row passes (relative error <= 1e-5).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from customshift_jax.config import MMDiTConfig

HELP = "check the JAX MMDiT against diffusers, number for number"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch", metavar="DIR", help="a diffusers transformer folder (or pipeline folder) to check; "
                   "default: the tiny presets with random weights")
    p.add_argument("--presets", default="tiny-sd3-medium,tiny-sd3.5-medium,tiny-sd3.5-large",
                   help="comma-separated presets to check when --torch is not given (default: the tiny ones)")
    p.add_argument("--height", type=int, default=12, help="latent height (default 12: non-square, below the "
                   "maximum position grid)")
    p.add_argument("--width", type=int, default=8, help="latent width (default 8)")
    p.add_argument("--batch", type=int, default=3, help="batch size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights")
    p.add_argument("--skip-layers", default="", help="comma-separated layer indices to skip, e.g. 1,2")
    p.add_argument("--per-block", action="store_true", help="print the error after every block")


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax.config import get_preset
    from customshift_jax.crosscheck import crosscheck_model, random_diffusers_transformer

    if args.height <= 0 or args.width <= 0 or args.batch <= 0:
        raise ValueError("--height, --width and --batch must be positive.")
    skip = [int(s) for s in args.skip_layers.split(",") if s.strip()]
    jobs = []
    if args.torch:
        from customshift_jax.api import load_transformer
        from customshift_jax.checkpoint_io import component_folder

        folder = component_folder(args.torch, "transformer")
        config, params = load_transformer(folder)  # validates every key before torch loads anything
        import torch
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        jobs.append((str(folder), config, model, params))
    else:
        for name in [n.strip() for n in args.presets.split(",") if n.strip()]:
            config = get_preset(name)
            jobs.append((name, config, random_diffusers_transformer(config, args.seed), None))

    header = f"{'model':<28} {'output shape':<20} {'max abs err':>12} {'rel err':>10} {'tol':>8}  result"
    print(header)
    print("-" * len(header))
    all_ok = True
    for name, config, model, params in jobs:
        _check_size(config, args)
        r = crosscheck_model(name, config, model, batch=args.batch, height=args.height, width=args.width,
                             seed=args.seed, skip_layers=skip, per_block=args.per_block, params=params)
        all_ok &= r.passed
        print(f"{name:<28} {str(r.shape):<20} {r.max_abs:>12.3e} {r.rel:>10.2e} {r.tolerance:>8.0e}  "
              f"{'PASS' if r.passed else 'FAIL'}")
        for i, ex, ec in r.per_block:
            text = "-" if ec is None else f"{ec:.2e}"
            print(f"    block {i:>3}: image stream rel err {ex:.2e}, text stream rel err {text}")
    print("all passed" if all_ok else "FAILED: JAX and diffusers disagree beyond the tolerance")
    return 0 if all_ok else 1


def _check_size(config: MMDiTConfig, args: argparse.Namespace) -> None:
    """The latent size must be a multiple of the patch size and fit the position grid."""
    p, m = config.patch_size, config.pos_embed_max_size
    if args.height % p or args.width % p:
        raise ValueError(f"--height and --width must be multiples of the patch size {p}.")
    if args.height // p > m or args.width // p > m:
        raise ValueError(f"--height/--width give a {args.height // p}x{args.width // p} grid, over "
                         f"pos_embed_max_size {m}.")
