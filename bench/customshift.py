"""CustomShift sampling cost against base SD3, in one run on one config (all JAX, fp32).

Rows: base SD3; CustomShift reading the reference cache (prefilled once); CustomShift recomputing the
Reference-Alignment Branch in every step; `concat` with the reference tokens run through the network in
every step (the token-concatenation baseline). Goal: cached CustomShift <= 1.15 x base.
Default: sd3-medium width, 4 layers, 512 px (64x64 latents), 28 steps, guidance 7, batch 1.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd3-medium")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--text-len", type=int, default=154, help="prompt tokens (77 CLIP + 77 T5 by default)")
    ap.add_argument("--subject-len", type=int, default=154, help="subject-name tokens")
    args = ap.parse_args()

    import jax
    import numpy as np

    from customshift_jax import MMDiTConfig, get_preset, init_mmdit
    from customshift_jax.customshift.branches import init_lora, prefill
    from customshift_jax.customshift.sampling import make_customshift_sampler
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.sampling import Conditioning, make_sampler, make_schedule

    config = MMDiTConfig.from_diffusers_config({**get_preset(args.preset).to_diffusers_config(),
                                               "num_layers": args.layers})
    lora = LoRAConfig(rank=16, alpha=16.0)
    params = init_mmdit(config, jax.random.key(0))
    rab, cgb = (init_lora(config, lora, jax.random.key(i), branch=b) for i, b in ((1, "rab"), (2, "cgb")))
    rng = np.random.default_rng(0)
    j, p = config.joint_attention_dim, config.pooled_projection_dim
    cond = Conditioning(*(rng.standard_normal(s).astype(np.float32) for s in
                          [(1, args.text_len, j), (1, p), (1, args.text_len, j), (1, p)]))
    ref = (rng.standard_normal((1, 16, args.size, args.size)).astype(np.float32),
           rng.standard_normal((1, args.subject_len, j)).astype(np.float32),
           rng.standard_normal((1, p)).astype(np.float32))
    latents = rng.standard_normal((1, 16, args.size, args.size)).astype(np.float32)
    schedule = make_schedule({"shift": 3.0}, args.steps)
    kw = dict(guidance_scale=7.0)

    def timed(name, fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())  # compile + first run
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return name, time.perf_counter() - t0, first

    base_sampler = make_sampler(config)
    cached_sampler = make_customshift_sampler(config, lora)
    recompute_sampler = make_customshift_sampler(config, lora, recompute_rab=True)
    concat_sampler = make_customshift_sampler(config, lora, shift="concat", recompute_rab=True)
    ref_extra = {"ref_latents": ref[0], "subject_embeds": ref[1], "subject_pooled": ref[2], "gamma": 1.0}

    def cached():
        cache = prefill(config, params, *ref, rab_lora=rab, lora_config=lora)  # once per reference: counted here
        return cached_sampler({"base": params, "cgb": cgb}, latents, cond, schedule,
                              extra={"ref_kv": cache.kv, "gamma": 1.0}, **kw)

    rows = [
        timed("base SD3", lambda: base_sampler(params, latents, cond, schedule, **kw)),
        timed("CustomShift, cached RAB (prefill once)", cached),
        timed("CustomShift, RAB every step", lambda: recompute_sampler(
            {"base": params, "cgb": cgb, "rab": rab}, latents, cond, schedule, extra=ref_extra, **kw)),
        timed("concat, reference tokens every step", lambda: concat_sampler(
            {"base": params, "cgb": cgb, "rab": rab}, latents, cond, schedule, extra=ref_extra, **kw)),
    ]
    print(f"config: {args.preset} width, {args.layers} layers, latents {args.size}x{args.size}, {args.steps} steps, "
          f"guidance 7 (CFG batched), batch 1, fp32, LoRA rank 16, {jax.devices()[0].platform}")
    base = rows[0][1]
    print(f"{'variant':<42} {'time (s)':>9} {'x base':>7} {'first call incl. compile (s)':>30}")
    for name, t, first in rows:
        print(f"{name:<42} {t:>9.2f} {t / base:>7.2f} {first:>30.2f}")


if __name__ == "__main__":
    main()
