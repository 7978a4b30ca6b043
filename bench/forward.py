"""JAX MMDiT forward vs diffusers' forward, same weights and inputs, one process.

Default: sd3-medium width (24 heads x 64), 4 layers, 64x64 latents (512 px), batch 1, fp32.
Prints the median time of each over several interleaved runs after warm-up, the ratio, and the relative error.
"""
from __future__ import annotations

import argparse

from _common import add_model_args, interleaved, mmdit_pair, setup_jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--text-len", type=int, default=154)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", default="xla", choices=["xla", "blocked", "jax", "cudnn"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch

    from _cases import forward_case

    setup_jax()
    pair = mmdit_pair(args.preset, args.layers, args.dtype)
    case = forward_case(pair, batch=args.batch, size=args.size, text_len=args.text_len, dtype=args.dtype,
                        backend=args.backend)
    timing = interleaved(case.run_jax, case.run_torch, args.runs)
    print(f"config: {args.preset} width, {args.layers} layers, latents {args.size}x{args.size}, batch {args.batch}, "
          f"{args.dtype}, backend {args.backend}, torch threads {torch.get_num_threads()}")
    print(f"jax compile     {case.compile_s:8.2f} s")
    print(f"jax forward     {timing.jax_s * 1e3:8.1f} ms (median of {args.runs})")
    print(f"torch forward   {timing.torch_s * 1e3:8.1f} ms (median of {args.runs})")
    print(f"ratio jax/torch {timing.ratio:8.2f}")
    print(f"relative error  {case.errors(timing.jax_out, timing.torch_out):>8s}")


if __name__ == "__main__":
    main()
