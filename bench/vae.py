"""JAX VAE decode vs diffusers' `AutoencoderKL.decode`, same random weights and latents, one process.

Default: SD3 VAE width, one 64x64 latent (512 px), fp32. Prints the median time of each over several runs
after a warm-up (JAX's includes no compile), their ratio, and the relative error.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()

    import diffusers
    import jax
    import numpy as np
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax.models.vae import VAEConfig, vae_decode, vae_params_from_state_dict
    from customshift_jax.numerics import relative_error

    if args.threads:
        torch.set_num_threads(args.threads)
    config = VAEConfig.sd3()
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**config.to_diffusers_config()).eval()
    params = vae_params_from_state_dict(config, model.state_dict())
    z = torch.randn(args.batch, config.latent_channels, args.size, args.size)
    decode = jax.jit(vae_decode, static_argnums=0)
    z_jax = jax.device_put(z.numpy())

    def time_torch() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.decode(z)
        return time.perf_counter() - t

    def time_jax() -> float:
        t = time.perf_counter()
        decode(config, params, z_jax).block_until_ready()
        return time.perf_counter() - t

    with torch.no_grad():
        ref = model.decode(z).sample.numpy()
    t = time.perf_counter()
    out = np.asarray(decode(config, params, z_jax))
    compile_s = time.perf_counter() - t
    t_torch = statistics.median(time_torch() for _ in range(args.runs))
    t_jax = statistics.median(time_jax() for _ in range(args.runs))
    px = args.size * config.downsample_factor
    print(f"SD3 VAE decode, batch {args.batch}, latent {args.size}x{args.size} ({px} px), fp32, "
          f"{jax.devices()[0].platform}, median of {args.runs}")
    print(f"diffusers: {t_torch:.3f} s   jax: {t_jax:.3f} s   jax/diffusers: {t_jax / t_torch:.2f}   "
          f"(jax first call incl. compile: {compile_s:.1f} s)")
    print(f"relative error: {relative_error(out, ref):.2e}")


if __name__ == "__main__":
    main()
