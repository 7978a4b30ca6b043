"""JAX VAE decode (or encode) vs diffusers' `AutoencoderKL`, same random weights and inputs, one process.

Default: SD3 VAE width, one 64x64 latent (512 px), fp32. Prints the median time of each over several interleaved
runs after a warm-up (JAX's compile apart), their ratio, and the relative error.
"""
from __future__ import annotations

import argparse

from _common import interleaved, setup_jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--kind", default="decode", choices=["decode", "encode"])
    args = ap.parse_args()

    import jax
    import torch

    from _cases import vae_case

    setup_jax()
    if args.threads:
        torch.set_num_threads(args.threads)
    case = vae_case(args.kind, batch=args.batch, size=args.size)
    timing = interleaved(case.run_jax, case.run_torch, args.runs)
    print(f"SD3 VAE {args.kind}, {case.shape}, latent {args.size}x{args.size}, fp32, {jax.devices()[0].platform}, "
          f"median of {args.runs}")
    print(f"diffusers: {timing.torch_s:.3f} s   jax: {timing.jax_s:.3f} s   jax/diffusers: {timing.ratio:.2f}   "
          f"(jax compile: {case.compile_s:.1f} s)")
    print(f"relative error: {case.errors(timing.jax_out, timing.torch_out)}")


if __name__ == "__main__":
    main()
