"""Per-device memory of each rule set at 8, 64 and 256 devices, for full-size SD3 models: which mesh fits.

Nothing is allocated: param and LoRA shapes come from `jax.eval_shape`, meshes are `AbstractMesh`es, and
per-device sizes come from the same rules (`customshift_jax.sharding.resolve`) the real runs use.

    python bench/sharding.py [--models sd3-medium sd3.5-large] [--devices 8 64 256] [--batch-per-device 1]

Columns (GiB per device):
  params   frozen base weights in bf16 (fp32 doubles it)
  lora     RAB + CGB LoRA (rank 16, every block linear) and beta, fp32
  adam     Adam's two moments of the LoRA, fp32 (2 x lora)
  acts     training activations saved at block boundaries with full remat, bf16:
           branches (2: RAB and CGB) x layers x 2 bytes x width x sum over the two streams of B_dev x T_dev,
           with T = 4096 image tokens at 1024 px (128 x 128 latent, patch 2) and 333 text tokens (77 CLIP +
           256 T5); the reference branch is taken at the same lengths. B_dev, T_dev: the per-device shares of
           the global batch (devices x batch-per-device) and of each stream's T under the rule set's layout of
           (batch, length, embed), the block-boundary constraint (333 does not split: the text stays whole).
           Not counted: one block's recomputed internals during backward, the attention logits, the cache.
  total    the sum; "fits" compares it with 16 GiB (TPU v5e), 32 GiB (v4) and 95 GiB (v5p) HBM.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from customshift_jax.customshift.branches import init_lora  # noqa: E402
from customshift_jax.models.mmdit.api import param_shapes  # noqa: E402
from customshift_jax.models.mmdit.config import get_preset  # noqa: E402
from customshift_jax.models.mmdit.lora import LoRAConfig  # noqa: E402
from customshift_jax.parallel import sharding as sh  # noqa: E402

GIB = 1024 ** 3
IMAGE_TOKENS = (1024 // 8 // 2) ** 2  # 1024 px -> 128 x 128 latent -> 64 x 64 patches
TEXT_TOKENS = 77 + 256
HBM = (("v5e", 16), ("v4", 32), ("v5p", 95))


def tensor_size(heads: int) -> int:
    """The largest of 8, 4, 2 that divides the head count (tensor parallelism splits whole heads)."""
    return next(t for t in (8, 4, 2, 1) if heads % t == 0)


def mesh_sizes(rules: str, n: int, heads: int) -> dict[str, int]:
    t = tensor_size(heads)
    c = 2 if n <= 8 else 4
    return {"dp": dict(data=n), "fsdp": dict(fsdp=n), "tp": dict(data=n // t, tensor=t),
            "fsdp_tp": dict(fsdp=n // t, tensor=t), "context": dict(context=c, fsdp=n // c)}[rules]


def lora_shapes(config, rank: int):
    lora = LoRAConfig(rank=rank, alpha=float(rank))
    return [jax.eval_shape(lambda b=branch: init_lora(config, lora, jax.random.key(0), branch=b))
            for branch in ("rab", "cgb")]


def row(name: str, config, rules: str, n: int, params, loras, batch_per_device: int) -> dict:
    sizes = mesh_sizes(rules, n, config.num_attention_heads)
    mesh = sh.abstract_mesh(n, **sizes)
    p = sh.bytes_per_device(params, mesh, rules, dtype=jnp.bfloat16)
    lora = sum(sh.bytes_per_device(tree, mesh, rules, dtype=jnp.float32) for tree in loras)
    acts = 0
    for tokens in (IMAGE_TOKENS, TEXT_TOKENS):  # the carry: image stream x and text stream c, each constrained
        layout = sh.resolve(("batch", "length", "embed"), (n * batch_per_device, tokens, config.inner_dim), mesh,
                            rules)
        acts += 2 * math.prod(layout.shard_shape) * 2 * config.num_layers  # 2 branches x ... x 2 bytes x L
    layouts = jax.tree_util.tree_leaves(sh.param_layouts(params, mesh, rules),
                                        is_leaf=lambda x: isinstance(x, sh.Layout))
    undivided = sorted({note.split(" !")[0].split(";")[0] for l in layouts for note in l.notes})
    total = p + lora + 2 * lora + acts
    fits = ",".join(chip for chip, gib in HBM if total <= gib * GIB) or "none"
    mesh_text = "x".join(f"{k}{v}" for k, v in sizes.items())
    return dict(model=name, rules=rules, devices=n, mesh=mesh_text, params=p / GIB, lora=lora / GIB,
                adam=2 * lora / GIB, acts=acts / GIB, total=total / GIB, fits=fits,
                note=("replicated: " + " | ".join(undivided)) if undivided else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd3-medium", "sd3.5-large"])
    parser.add_argument("--devices", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument("--rules", nargs="+", default=list(sh.RULE_SETS))
    parser.add_argument("--batch-per-device", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    header = ("model", "rules", "devices", "mesh", "params", "lora", "adam", "acts", "total", "fits", "note")
    rows = []
    for name in args.models:
        config = get_preset(name)
        params = param_shapes(config)
        loras = lora_shapes(config, args.rank)
        full = sh.tree_bytes(params, dtype=jnp.bfloat16) / GIB
        lora_full = sum(sh.tree_bytes(t, dtype=jnp.float32) for t in loras) / GIB
        print(f"{name}: {sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) / 1e9:.2f} B params "
              f"({full:.2f} GiB bf16), LoRA rank {args.rank} RAB+CGB {lora_full * GIB / 4 / 1e6:.1f} M "
              f"({lora_full:.3f} GiB fp32), heads {config.num_attention_heads} -> tensor "
              f"{tensor_size(config.num_attention_heads)}")
        for rules in args.rules:
            for n in args.devices:
                rows.append(row(name, config, rules, n, params, loras, args.batch_per_device))
    print(f"\nGiB per device; global batch = devices x {args.batch_per_device}, 1024 px, "
          f"{IMAGE_TOKENS}+{TEXT_TOKENS} tokens\n")
    cells = [[str(r[h]) if not isinstance(r[h], float) else f"{r[h]:.3f}" for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |")


if __name__ == "__main__":
    main()
