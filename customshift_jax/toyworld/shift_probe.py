"""What the learned shift does in the world's trained model: beta per layer and head, and alpha, the attention
mass the image queries put on the reference, per layer (DESIGN section 4), for CustomShift and the trained
concatenation baseline on held-out subjects at several noise levels. `python -m customshift_jax.toyworld.shift_probe`
prints both tables (docs/world.md, "What the shift learned")."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.customshift.branches import lora_model
from customshift_jax.customshift.cads import CustomShiftAttnProcessor, shift_logit
from customshift_jax.models.mmdit.api import skip_mask
from customshift_jax.models.mmdit.attention import attention
from customshift_jax.toyworld import evaluate as E
from customshift_jax.sampling.sampler import noise_for
from customshift_jax.toyworld.methods import METHODS, WEIGHTS, Generator, WorldModel
from customshift_jax.toyworld.tiny_sd3 import LATENT_SHAPE
from customshift_jax.tree_paths import named_leaves


@dataclasses.dataclass(frozen=True)
class AlphaProbe(CustomShiftAttnProcessor):
    """CustomShift's processor that also sows alpha, mean over the image queries, per head: (B, H) per layer."""

    def __call__(self, attn, q, k, v, *, n_img, per_layer, shared):
        out = super().__call__(attn, q, k, v, n_img=n_img, per_layer=per_layer, shared=shared)
        if per_layer is not None:
            beta = (attn.get_variable("lora", "beta") if attn.has_variable("lora", "beta")
                    else jnp.zeros((attn.heads,), jnp.float32))  # read again: `beta()` would create it twice
            lam = shift_logit(beta, 1.0 if shared is None else shared, self.shift)
            k_ref, v_ref = (jnp.broadcast_to(a, (q.shape[0],) + a.shape[1:]) for a in per_layer)
            _, lse_base = attention(q, k, v, return_lse=True)
            _, lse_ref = attention(q[:, :n_img], k_ref, v_ref, return_lse=True)
            lam = lam[None, :, None] if lam.ndim == 1 else lam[:, :, None]
            alpha = jax.nn.sigmoid(lse_ref - lse_base[..., :n_img] + lam)  # (B, H, n_img)
            attn.sow("intermediates", "alpha", alpha.mean(-1))
        return out


def beta_table(model: WorldModel, lora_name: str = "customshift") -> np.ndarray:
    """beta (layers, heads) of a trained CGB tree."""
    _, _, cgb = model.loras[lora_name]
    found = [np.asarray(leaf) for path, leaf in named_leaves(cgb) if path[-1] == "beta"]
    if not found:
        raise ValueError(f"the {lora_name} LoRA has no beta.")
    return np.concatenate([b.reshape(-1, b.shape[-1]) for b in found])


def alpha_per_layer(model: WorldModel, method: str, cases: Sequence[E.Case], ts: Sequence[float],
                    gamma: float = 1.0) -> np.ndarray:
    """Mean alpha (len(ts), layers, heads) of `method` on `cases`: targets noised to each t (x_t = (1 - t) x_0 +
    t eps), the prompt's text, the case's reference through the RAB."""
    lora_name, shift, _ = METHODS[method]
    lora_config, rab, cgb = model.loras[lora_name]
    generator = Generator(model)
    pipe = generator.pipes[lora_name]
    refs = model.encode_images(E.references(cases))
    kv = pipe.reference_cache(model.params, rab, refs, *model.encode_text([c.subject.name for c in cases]))
    embeds, pooled = model.encode_text([c.prompt for c in cases])
    x0 = model.encode_images(E.targets(cases))
    noise = jnp.asarray(noise_for([jax.random.key(c.seed) for c in cases], LATENT_SHAPE))
    net = lora_model(model.config, lora_config).clone(options=lora_model(model.config, lora_config).options.replace(
        processor=AlphaProbe(shift)))
    skip = jnp.asarray(skip_mask(model.config, None))

    @jax.jit
    def alphas(t):
        x_t = (1 - t) * x0 + t * noise
        tt = jnp.full((x0.shape[0],), 1000.0 * t, jnp.float32)
        _, state = net.apply({"params": model.params, "lora": cgb}, x_t, tt, embeds, pooled, skip, kv,
                             jnp.float32(gamma), mutable=["intermediates"])
        layers = [leaf for leaf in jax.tree_util.tree_leaves(state["intermediates"])]  # (L_group, B, H) each
        return jnp.concatenate([a.reshape(-1, *a.shape[-2:]) for a in layers]).mean(1)  # (L, H)

    return np.stack([np.asarray(alphas(jnp.float32(t))) for t in ts])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--ts", default="0.25,0.5,0.75,1.0", help="noise levels t, comma-separated")
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args(argv)
    model = WorldModel.load(args.weights)
    cases = E.draw_cases(args.seed, args.subjects, 1)
    ts = [float(t) for t in args.ts.split(",")]
    beta = beta_table(model)
    print("beta (CustomShift's CGB), per layer and head:")
    print("| layer | " + " | ".join(f"head {h}" for h in range(beta.shape[1])) + " |")
    print("|---|" + "---|" * beta.shape[1])
    for i, row in enumerate(beta):
        print(f"| {i} | " + " | ".join(f"{b:+.3f}" for b in row) + " |")
    print(f"\nalpha, mean attention mass on the reference over image queries and heads ({len(cases)} held-out "
          "subjects, gamma 1):")
    results = {m: alpha_per_layer(model, m, cases, ts) for m in ("concat (trained)", "joint (trained)", "customshift")
               if m in model.methods()}
    print("| method | t | " + " | ".join(f"layer {i}" for i in range(beta.shape[0])) + " |")
    print("|---|---|" + "---|" * beta.shape[0])
    for m, a in results.items():
        for t, row in zip(ts, a):
            print(f"| {m} | {t:g} | " + " | ".join(f"{x:.3f}" for x in row.mean(-1)) + " |")


if __name__ == "__main__":
    main()
