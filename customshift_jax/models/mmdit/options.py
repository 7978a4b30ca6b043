"""How a forward runs, as one frozen object beside the config (what the model is): precision, attention backend,
rematerialisation, what to return, the LoRA hooks, the joint-attention processor, the activation-sharding hook."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.processor import JointAttnProcessor, PlainAttnProcessor

# Sharding hook at block boundaries: `hook(x, logical_axes) -> x`, e.g. a `with_sharding_constraint` by rules.
ActivationHook = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
RETURNS = ("sample", "sample_and_blocks", "kv")
REMATS = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """dtype: compute; param_dtype: of created params; backend: attention kernel (`attention.BACKENDS`);
    remat: "none" | "full" | "dots" per block; returns: "sample" (B, C, H, W), "sample_and_blocks" (sample,
    per-group (x, c) after each block) or "kv" ({group: (K, V)} of every layer's joint attention, (L, B, N+M, H,
    D) each); lora: LoRA hooks on the linears (None: none); processor: the joint attention; activation_sharding:
    the block-boundary hook (None: no constraint)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    backend: str = "xla"
    remat: str = "none"
    returns: str = "sample"
    lora: LoRAConfig | None = None
    processor: JointAttnProcessor = PlainAttnProcessor()
    activation_sharding: ActivationHook | None = None

    def __post_init__(self):
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
