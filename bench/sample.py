"""The jitted JAX sampler vs diffusers' StableDiffusion3Pipeline: same transformer weights, latents and embeddings.

Default: 28 steps with CFG (guidance 7), sd3-medium width (24 heads x 64, joint 4096, pooled 2048) at 4 layers,
512 px (latents 64x64), batch 1, 333 text tokens (77 CLIP + 256 T5, diffusers' default), fp32, output_type="latent".
Prints the JAX compile time apart, then each side's sampling time, the ratio and the relative error of the final
latents. The pipeline gets a tiny VAE and null text encoders (neither is used).
"""
from __future__ import annotations

import argparse

from _common import add_model_args, interleaved, mmdit_pair, setup_jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0, help="CFG scale (<= 1: no CFG)")
    ap.add_argument("--text-len", type=int, default=333)
    ap.add_argument("--runs", type=int, default=1, help="timed runs of each side (median, interleaved)")
    args = ap.parse_args()

    import jax
    import torch

    from _cases import sampling_case

    setup_jax()
    case = sampling_case(mmdit_pair(args.preset, args.layers), batch=args.batch, size=args.size,
                         text_len=args.text_len, steps=args.steps, guidance=args.guidance)
    timing = interleaved(case.run_jax, case.run_torch, args.runs, warmup=False)
    tj, tt = timing.jax_s, timing.torch_s
    print(f"config: {args.preset} width, {args.layers} layers, {case.shape}, fp32, jax {jax.default_backend()}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"jax compile      {case.compile_s:8.2f} s")
    print(f"jax sampling     {tj:8.2f} s  ({tj / args.steps * 1e3:.0f} ms/step, median of {args.runs})")
    print(f"torch sampling   {tt:8.2f} s  ({tt / args.steps * 1e3:.0f} ms/step, median of {args.runs})")
    print(f"ratio jax/torch  {timing.ratio:8.2f}")
    print(f"relative error   {case.errors(timing.jax_out, timing.torch_out):>8s}")


if __name__ == "__main__":
    main()
