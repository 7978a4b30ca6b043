"""The fields of transformers' CLIPTextConfig and T5Config that the Flax encoders use, read from config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower (CLIP-L, OpenCLIP bigG) as `CLIPTextModelWithProjection` builds it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    projection_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported; expected one of {CLIP_ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (SD3's T5-XXL) as `T5EncoderModel` builds it: gated-GELU feed-forward, relative buckets."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self) -> None:
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported; SD3's T5 v1.1 uses "
                             "'gated-gelu'")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def _fields(cls: type, raw: dict[str, Any], path: Path) -> dict[str, Any]:
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in names.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in raw]
    if missing:
        raise ValueError(f"{path}: missing {missing} for a {cls.__name__}; is this the right text encoder folder?")
    return {n: raw[n] for n in names if n in raw and raw[n] is not None}


def read_config(path: str | Path) -> CLIPTextConfig | T5Config:
    """The config of a transformers text encoder folder (or its config.json), by its `model_type`."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a transformers text encoder folder with config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e
    kind = raw.get("model_type")
    if kind == "clip_text_model":
        return CLIPTextConfig(**_fields(CLIPTextConfig, raw, path))
    if kind == "t5":
        return T5Config(**_fields(T5Config, raw, path))
    raise ValueError(f"{path}: model_type {kind!r} is not a text encoder we run in JAX (expected 'clip_text_model' "
                     "or 't5'); use --text-backend torch")
