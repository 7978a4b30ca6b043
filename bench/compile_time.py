"""jit compile time of the MMDiT at two depths: scanned blocks keep it flat (target: 24 within 1.5x of 2)."""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="sd3-medium")
    ap.add_argument("--depths", default="2,24")
    ap.add_argument("--size", type=int, default=64, help="latent height and width")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from customshift_jax import MMDiTConfig, get_preset, make_forward, param_shapes

    base = get_preset(args.preset).to_diffusers_config()
    times = {}
    depths = [int(d) for d in args.depths.split(",")]
    # Warm-up: the first compile in a process also pays one-off start-up costs; it is not counted.
    for i, depth in enumerate([depths[0]] + depths):
        config = MMDiTConfig.from_diffusers_config({**base, "num_layers": depth})
        shapes = param_shapes(config)  # nothing allocated: compile from shapes
        f32 = jnp.float32
        specs = (shapes, jax.ShapeDtypeStruct((1, 16, args.size, args.size), f32), jax.ShapeDtypeStruct((1,), f32),
                 jax.ShapeDtypeStruct((1, 154, config.joint_attention_dim), f32),
                 jax.ShapeDtypeStruct((1, config.pooled_projection_dim), f32),
                 jax.ShapeDtypeStruct((depth,), bool))
        t0 = time.perf_counter()
        jax.jit(make_forward(config)).lower(*specs).compile()
        if i == 0:
            continue
        times[depth] = time.perf_counter() - t0
        print(f"{args.preset} {depth:>3} layers ({len(config.block_groups())} scanned groups): "
              f"compile {times[depth]:6.2f} s")
    depths = sorted(times)
    print(f"ratio {depths[-1]} / {depths[0]} layers: {times[depths[-1]] / times[depths[0]]:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
