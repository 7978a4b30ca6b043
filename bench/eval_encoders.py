"""The eval image encoders: PyTorch (transformers' ViTModel) vs `customshift_jax.eval.vit_jax`, same random weights.

Configs: DINO ViT-S/16 (width 384, 6 heads, patch 16) and a ViT-B/32 tower as CLIP's (width 768, 12 heads,
patch 32), 12 layers, 224 px. Prints the median seconds per batch of each after a warm-up (JAX's includes no
compile), images per second, their ratio and the relative error of the CLS embeddings. This is what decided
that `customshift eval` runs its image towers in JAX by default (customshift_jax/eval/encoders.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CONFIGS = {"dino-vit-s16": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, patch_size=16),
           "clip-vit-b32": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, patch_size=32)}


def timed(fn, runs: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=16, help="images per call")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (the median is printed)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    import numpy as np
    from transformers import ViTConfig, ViTModel

    from customshift_jax.eval.vit_jax import jax_params, vit_cls
    from customshift_jax.numerics import relative_error

    print(f"backend {jax.default_backend()}, torch threads {torch.get_num_threads()}, batch {args.batch}, fp32")
    print("| encoder | PyTorch s/batch | JAX s/batch | PyTorch img/s | JAX img/s | JAX / PyTorch time | rel. err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        config = ViTConfig(num_hidden_layers=12, image_size=224, **cfg)
        model = ViTModel(config, add_pooling_layer=False).eval()
        params = jax_params(model.state_dict())
        x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
        fwd = jax.jit(lambda p, x, c=config: vit_cls(p, x, heads=c.num_attention_heads, eps=c.layer_norm_eps))
        xt, xj = torch.from_numpy(x), jax.device_put(x)

        def run_torch():
            with torch.no_grad():
                return model(pixel_values=xt).last_hidden_state[:, 0].numpy()

        def run_jax():
            return np.asarray(jax.block_until_ready(fwd(params, xj)))

        t_torch, t_jax = timed(run_torch, args.runs), timed(run_jax, args.runs)
        err = relative_error(run_jax(), run_torch())
        print(f"| {name} | {t_torch:.3f} | {t_jax:.3f} | {args.batch / t_torch:.1f} | {args.batch / t_jax:.1f} | "
              f"{t_jax / t_torch:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
