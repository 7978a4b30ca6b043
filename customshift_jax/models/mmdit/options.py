"""How a forward runs, as one frozen object beside the config (what the model is): precision, attention backend,
rematerialisation, what to return, the LoRA hooks, the joint-attention processor, the activation-sharding hook
and the flash kernels' mesh layout. Every entry point (forward, prefill, samplers, train steps) takes one."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from customshift_jax.models.mmdit.attention import BACKENDS
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.processor import JointAttnProcessor, PlainAttnProcessor
from customshift_jax.numerics import float_dtype

# Sharding hook at block boundaries: `hook(x, logical_axes) -> x`, e.g. a `with_sharding_constraint` by rules.
ActivationHook = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
# The flash kernels' split of (batch, heads) over mesh axes: (batch axes, head axes); see `kernels.partition`.
KernelLayout = tuple[tuple[str, ...], tuple[str, ...]]
RETURNS = ("sample", "sample_and_blocks", "kv")
REMATS = ("none", "full", "dots")


def as_dtype(dtype: Any) -> Any:
    """jnp dtype from a name ("fp32", "bf16", ...) or a dtype."""
    return getattr(jnp, float_dtype(dtype).name) if isinstance(dtype, str) else dtype


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """dtype: compute; param_dtype: of created params; backend: attention kernel (`attention.BACKENDS`);
    remat: "none" | "full" | "dots" per block; returns: "sample" (B, C, H, W), "sample_and_blocks" (sample,
    per-group (x, c) after each block) or "kv" ({group: (K, V)} of every layer's joint attention, (L, B, N+M, H,
    D) each); lora_config: LoRA hooks on the linears (None: none); processor: the joint attention; activation_sharding:
    the block-boundary hook (None: no constraint; `parallel.sharding.activation_hook(mesh, rules)` on a mesh);
    kernel_layout: the mesh axes the flash kernels split batch and heads over (None: chosen from the mesh).
    dtype and param_dtype may be given by name ("bf16", "fp32", ...)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    backend: str = "xla"
    remat: str = "none"
    returns: str = "sample"
    lora_config: LoRAConfig | None = None
    processor: JointAttnProcessor = PlainAttnProcessor()
    activation_sharding: ActivationHook | None = None
    kernel_layout: KernelLayout | None = None

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, as_dtype(getattr(self, name)))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend={self.backend!r}; expected one of {BACKENDS}.")
        if self.kernel_layout is not None:
            batch_axes, head_axes = self.kernel_layout
            object.__setattr__(self, "kernel_layout", (tuple(batch_axes), tuple(head_axes)))
        if self.returns not in RETURNS:
            raise ValueError(f"unknown returns={self.returns!r}; expected one of {RETURNS}.")
        if self.remat not in REMATS:
            raise ValueError(f"unknown remat={self.remat!r}; expected one of {REMATS}.")

    def replace(self, **changes: Any) -> "RunOptions":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def collect_outputs(self) -> bool:
        return self.returns == "sample_and_blocks"

    @property
    def emit_kv(self) -> bool:
        return self.returns == "kv"
