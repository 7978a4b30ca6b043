"""Pick the text encoders' backend: PyTorch on the host (`TextEncoders`) or JAX (`JaxTextEncoders`), one interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from customshift_jax.text.encode import TextEncoders
from customshift_jax.text.jax.encoders import JaxTextEncoders

TEXT_BACKENDS = ("torch", "jax")


def load_text_encoders(folder: str | Path, *, backend: str = "torch", dtype: str = "float32",
                       joint_attention_dim: int | None = None, mesh: Any = None, rules: Any = "fsdp") -> Any:
    """The text encoders of a diffusers SD3 folder on `backend` ("torch" or "jax"; `mesh`/`rules` for jax only)."""
    if backend == "torch":
        if mesh is not None:
            raise ValueError("a mesh for the text encoders needs --text-backend jax (the torch ones run on the host)")
        return TextEncoders.from_pretrained(folder, dtype=dtype, joint_attention_dim=joint_attention_dim)
    if backend == "jax":
        return JaxTextEncoders.from_pretrained(folder, dtype=dtype, joint_attention_dim=joint_attention_dim, mesh=mesh,
                                               rules=rules)
    raise ValueError(f"--text-backend {backend!r}: expected one of {', '.join(TEXT_BACKENDS)}")
