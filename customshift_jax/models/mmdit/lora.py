"""LoRA on the linears of the joint blocks: config, targeting by module path, init, and merge.

LoRA params live in their own variable collection, "lora", with the same paths as the base params
(`.../attn/to_q/lora_A`), so the frozen base tree is shared by both CustomShift branches while each
branch has its own LoRA tree. Kernels are (in, r) and (r, out); PEFT's are their transposes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Every linear of the joint blocks: q, k, v, out of both streams (and of attn2), both MLPs.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha (scale = alpha / rank) and target modules (dotted suffixes of diffusers module names)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_path(self, path: tuple[str, ...]) -> bool:
        """Whether the linear at flax module `path` gets LoRA (only inside `transformer_blocks`)."""
        if not path or path[0] != "transformer_blocks":
            return False
        dotted = ".".join(p for p in path if p != "scan")
        return any(dotted.endswith("." + t) for t in self.targets)


def lora_delta(lora: dict, scale: float) -> jax.Array:
    """scale * A @ B for one linear's LoRA dict (stacked or not): the update to its kernel."""
    return scale * jnp.matmul(lora["lora_A"].astype(jnp.float32), lora["lora_B"].astype(jnp.float32))


def merge_lora(params: dict, lora: dict, config: LoRAConfig) -> dict:
    """Fold a branch's LoRA into the base kernels (for inference without the LoRA path). Only A, B pairs are
    kernel updates: other leaves of the "lora" collection (a processor's own variables) are left out."""

    def merge(p, l):
        out = dict(p)
        if "lora_A" in l:
            out["kernel"] = (p["kernel"].astype(jnp.float32) + lora_delta(l, config.scale)).astype(p["kernel"].dtype)
        for key, sub in l.items():
            if isinstance(sub, dict):
                out[key] = merge(p[key], sub)
        return out

    return merge(params, lora)


def _tokens_first(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])  # (..., F) -> (T, F)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_product(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * (x A) B, x (..., in), A (in, r), B (r, out): a LoRA's term of its linear.

    Its backward contracts the tokens with the token-major operands (x, the incoming gradient) in the layout they
    are stored in, and transposes only rank-r arrays: autodiff's form transposed a (tokens, out) gradient, which
    XLA:CPU fused into the producing elementwise pass (a strided write of the whole activation)."""
    return scale * jnp.dot(jnp.dot(x, a), b)


def _lora_product_fwd(x, a, b, scale):
    h = jnp.dot(x, a)  # (..., r): kept for the backward (rank r: small)
    return scale * jnp.dot(h, b), (x, a, b, h)


def _lora_product_bwd(scale, res, g):  # g (..., out)
    x, a, b, h = res
    x2, g2 = _tokens_first(x), _tokens_first(g)                                # (T, in), (T, out)
    h_t = _tokens_first(h).T                                                   # (r, T)
    gb_t = scale * jax.lax.dot_general(b, g2, (((1,), (1,)), ((), ())))        # (r, T) = (s g B^T)^T
    h_t, gb_t = jax.lax.optimization_barrier((h_t, gb_t))  # keep the r-row forms: XLA would fold the transposes
    da = jnp.dot(gb_t, x2).T                                                   # (in, r)
    db = scale * jnp.dot(h_t, g2)                                              # (r, out)
    dx = jax.lax.dot_general(gb_t, a, (((0,), (1,)), ((), ())))                # (T, in)
    return dx.reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype)


lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)
