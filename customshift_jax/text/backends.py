"""Pick the text encoders' backend: PyTorch on the host (`TextEncoders`) or JAX (`JaxTextEncoders`), one interface.

"auto" (the default) is jax for our checkpoint holding the encoders (`customshift convert --components
text_encoders`), torch for a diffusers folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from customshift_jax.io.checkpoint import checkpoint_components, is_checkpoint
from customshift_jax.text.encode import TextEncoders
from customshift_jax.text.jax.encoders import JaxTextEncoders

TEXT_BACKENDS = ("auto", "torch", "jax")


def holds_converted_encoders(source: str | Path) -> bool:
    """Whether `source` is our checkpoint holding converted encoders (`convert --components text_encoders`), not
    transformers folders kept beside our components (as the subject world's shipped model does)."""
    return is_checkpoint(source) and {"text_encoder", "text_encoder_2"} <= set(checkpoint_components(source))


def resolve_text_backend(source: str | Path, backend: str = "auto") -> str:
    """The backend "auto" stands for with this text-encoder source: jax for our checkpoint holding converted
    encoders, torch otherwise (transformers folders)."""
    if backend not in TEXT_BACKENDS:
        raise ValueError(f"--text-backend {backend!r}: expected one of {', '.join(TEXT_BACKENDS)}")
    if backend != "auto":
        return backend
    return "jax" if holds_converted_encoders(source) else "torch"


def load_text_encoders(folder: str | Path, *, backend: str = "auto", dtype: str = "float32",
                       joint_attention_dim: int | None = None, mesh: Any = None, rules: Any = "fsdp") -> Any:
    """The text encoders of a diffusers SD3 folder or of our checkpoint on `backend` ("auto", "torch" or "jax";
    `mesh`/`rules` for jax only)."""
    backend = resolve_text_backend(folder, backend)
    if backend == "torch":
        if holds_converted_encoders(folder):
            raise ValueError(f"--text-backend torch: {folder} is a customshift checkpoint, whose text encoders run in "
                             "JAX; use --text-backend jax (or auto), or pass --text-encoders PIPELINE_FOLDER (for "
                             f"PyTorch: customshift export {folder} DIR --components text_encoders)")
        if mesh is not None:
            raise ValueError("a mesh for the text encoders needs --text-backend jax (the torch ones run on the host)")
        return TextEncoders.from_pretrained(folder, dtype=dtype, joint_attention_dim=joint_attention_dim)
    return JaxTextEncoders.from_pretrained(folder, dtype=dtype, joint_attention_dim=joint_attention_dim, mesh=mesh,
                                           rules=rules)
