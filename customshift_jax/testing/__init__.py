"""Test and demo helpers: a tiny random SD3 pipeline folder (torch/diffusers are imported only when building)."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = (
    "DEFAULT_TRANSFORMER_CONFIG",
    "DEFAULT_VAE_CONFIG",
    "TINY_POOLED_WIDTH",
    "TINY_T5_WIDTH",
    "TINY_TEXT_WIDTHS",
    "build_tiny_pipeline",
    "load_pipeline",
    "null_components",
)
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Resolve the exports lazily, so `python -m customshift_jax.testing.tiny_pipeline` runs cleanly."""
    if name in _EXPORTS:
        return getattr(importlib.import_module("customshift_jax.testing.tiny_pipeline"), name)
    raise AttributeError(f"module 'customshift_jax.testing' has no attribute {name!r}")
