"""JAX MMDiT forward vs diffusers' forward, same weights and inputs, one process.

Default: sd3-medium width (24 heads x 64), 4 layers, 64x64 latents (512 px), batch 1, fp32.
Prints the median time of each over several runs after warm-up, the ratio, and the relative error.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="sd3-medium")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", default="xla", choices=["xla", "blocked", "jax", "cudnn"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax import MMDiTConfig, get_preset, make_forward
    from customshift_jax.crosscheck.mmdit import ForwardInputs, random_diffusers_transformer
    from customshift_jax.models.mmdit.api import skip_mask
    from customshift_jax.models.mmdit.mapping import params_from_state_dict
    from customshift_jax.models.mmdit.options import RunOptions, as_dtype
    from customshift_jax.numerics import relative_error

    config = MMDiTConfig.from_diffusers_config({**get_preset(args.preset).to_diffusers_config(),
                                               "num_layers": args.layers})
    model = random_diffusers_transformer(config, seed=0, dtype=args.dtype)
    dtype = as_dtype(args.dtype)
    params = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a, dtype),
                                    params_from_state_dict(config, model.state_dict()))
    inputs = ForwardInputs.random(config, batch=args.batch, height=args.size, width=args.size, text_len=154)
    fwd = jax.jit(make_forward(config, RunOptions(dtype=dtype, backend=args.backend)))
    jax_args = (params, inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states,
                inputs.pooled_projections, skip_mask(config, None))

    t0 = time.perf_counter()
    compiled = fwd.lower(*jax_args).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return np.asarray(jax.block_until_ready(compiled(*jax_args)), np.float32)

    torch_in = inputs.torch(args.dtype)

    def run_torch():
        with torch.no_grad():
            return model(**torch_in).sample.float().numpy()

    def median_time(fn):
        out = fn()  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    tj, out_j = median_time(run_jax)
    tt, out_t = median_time(run_torch)
    print(f"config: {args.preset} width, {args.layers} layers, latents {args.size}x{args.size}, batch {args.batch}, "
          f"{args.dtype}, backend {args.backend}, torch threads {torch.get_num_threads()}")
    print(f"jax compile     {compile_s:8.2f} s")
    print(f"jax forward     {tj * 1e3:8.1f} ms (median of {args.runs})")
    print(f"torch forward   {tt * 1e3:8.1f} ms (median of {args.runs})")
    print(f"ratio jax/torch {tj / tt:8.2f}")
    print(f"relative error  {relative_error(out_j, out_t):8.2e}")


if __name__ == "__main__":
    main()
