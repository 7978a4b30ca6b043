"""The jitted JAX sampler vs diffusers' StableDiffusion3Pipeline: same transformer weights, latents and embeddings.

Default: 28 steps with CFG (guidance 7), sd3-medium width (24 heads x 64, joint 4096, pooled 2048) at 4 layers,
512 px (latents 64x64), batch 1, 333 text tokens (77 CLIP + 256 T5, diffusers' default), fp32, output_type="latent".
Prints the JAX compile time apart, then each side's sampling time, the ratio and the relative error of the final
latents. The pipeline gets a tiny VAE and null text encoders (neither is used).
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
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0, help="CFG scale (<= 1: no CFG)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=333)
    ap.add_argument("--runs", type=int, default=1, help="timed runs of each side (median)")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax import MMDiTConfig, get_preset
    from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
    from customshift_jax.models.mmdit.mapping import params_from_state_dict
    from customshift_jax.numerics import relative_error
    from customshift_jax.sampling import Conditioning, make_sampler, make_schedule
    from customshift_jax.testing.tiny_pipeline import DEFAULT_VAE_CONFIG

    config = MMDiTConfig.from_diffusers_config({**get_preset(args.preset).to_diffusers_config(),
                                               "num_layers": args.layers})
    model = random_diffusers_transformer(config, seed=0)
    params = jax.tree_util.tree_map(jax.numpy.asarray, params_from_state_dict(config, model.state_dict()))
    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**DEFAULT_VAE_CONFIG),
        **dict.fromkeys(["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                         "tokenizer_3"]))
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    b, m = args.batch, args.text_len
    latents = rng.standard_normal((b, config.in_channels, args.size, args.size)).astype(np.float32)
    embeds = [rng.standard_normal(s).astype(np.float32) for s in
              [(b, m, config.joint_attention_dim), (b, config.pooled_projection_dim)] * 2]
    cfg = args.guidance > 1
    cond = Conditioning(*embeds) if cfg else Conditioning(*embeds[:2])
    schedule = make_schedule(dict(pipe.scheduler.config), args.steps)

    run = make_sampler(config)
    jax_args = (params, latents, cond, schedule, np.float32(args.guidance), None, None, None)
    t0 = time.perf_counter()
    compiled = run.jitted.lower(*jax_args, cfg=cfg).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return np.asarray(jax.block_until_ready(compiled(*jax_args)))

    t = torch.from_numpy
    neg = dict(negative_prompt_embeds=t(embeds[2]), negative_pooled_prompt_embeds=t(embeds[3])) if cfg else {}
    px = args.size * pipe.vae_scale_factor  # only checked for divisibility: the latents are given

    def run_torch():
        with torch.no_grad():
            return pipe(height=px, width=px, num_inference_steps=args.steps, guidance_scale=args.guidance,
                        latents=t(latents), prompt_embeds=t(embeds[0]), pooled_prompt_embeds=t(embeds[1]),
                        output_type="latent", **neg).images.float().numpy()

    def median_time(fn):
        times, out = [], None
        for _ in range(args.runs):
            t1 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t1)
        return statistics.median(times), out

    tj, out_j = median_time(run_jax)
    tt, out_t = median_time(run_torch)
    print(f"config: {args.preset} width, {args.layers} layers, latents {args.size}x{args.size} "
          f"({px * 8 // pipe.vae_scale_factor} px at VAE factor 8), batch {b}, text {m}, {args.steps} steps, "
          f"guidance {args.guidance} ({'CFG, 2B per call' if cfg else 'no CFG'}), fp32, "
          f"jax {jax.default_backend()}, torch threads {torch.get_num_threads()}")
    print(f"jax compile      {compile_s:8.2f} s")
    print(f"jax sampling     {tj:8.2f} s  ({tj / args.steps * 1e3:.0f} ms/step, median of {args.runs})")
    print(f"torch sampling   {tt:8.2f} s  ({tt / args.steps * 1e3:.0f} ms/step, median of {args.runs})")
    print(f"ratio jax/torch  {tj / tt:8.2f}")
    print(f"relative error   {relative_error(out_j, out_t):8.2e}")


if __name__ == "__main__":
    main()
