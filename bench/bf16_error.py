"""bf16 accuracy: JAX bf16 and PyTorch bf16 forwards, each against the fp32 PyTorch forward."""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", default="tiny-sd3-medium,tiny-sd3.5-medium,tiny-sd3.5-large,sd3-medium")
    ap.add_argument("--layers", type=int, default=4, help="layers for the full-width presets")
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax import MMDiTConfig, get_preset
    from customshift_jax.crosscheck.mmdit import ForwardInputs, jax_forward, random_diffusers_transformer, torch_forward
    from customshift_jax.models.mmdit.mapping import params_from_state_dict
    from customshift_jax.numerics import relative_error

    print(f"{'preset':<20} {'jax bf16 vs torch fp32':>24} {'torch bf16 vs torch fp32':>26}")
    for name in args.presets.split(","):
        cfg = get_preset(name)
        if not name.startswith("tiny"):
            cfg = MMDiTConfig.from_diffusers_config({**cfg.to_diffusers_config(), "num_layers": args.layers})
        model = random_diffusers_transformer(cfg, seed=0)
        inputs = ForwardInputs.random(cfg, batch=2, height=args.size, width=args.size // 4 * 3)
        ref, _ = torch_forward(model, inputs)
        torch_bf16, _ = torch_forward(copy.deepcopy(model).to(torch.bfloat16), inputs)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16),
                                        params_from_state_dict(cfg, model.state_dict()))
        ours, _ = jax_forward(cfg, params, inputs, dtype="bfloat16")
        print(f"{name:<20} {relative_error(ours, ref):>24.3e} {relative_error(torch_bf16, ref):>26.3e}")


if __name__ == "__main__":
    main()
