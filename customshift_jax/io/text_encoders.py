"""SD3's text encoders in our checkpoint: their component names, and what `customshift convert --components
text_encoders` reads from a diffusers pipeline folder (the three encoders, validated from their headers, streamed
as the params `io.transformers_folder` reads, and the three tokenizer folders copied as files). `customshift
export` writes them back with `models.text_encoders.mapping.text_state_dict`."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.safetensors import SafetensorsFile
from customshift_jax.io.transformers_folder import encoder_leaves, weight_files

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # their component names: CLIP-L, CLIP-G, T5
TEXT_ENCODERS = "text_encoders"  # the --components name of all three
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
REQUIRED = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # T5 (text_encoder_3, tokenizer_3) optional
CLASSES_KEY = "text_classes"  # in the marker: {part: model_index.json entry} of the source, for export
DEFAULT_CLASSES = {"text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_3": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "tokenizer_3": ["transformers", "T5TokenizerFast"]}
Leaf = tuple[tuple[str, ...], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TextEncoderSource:
    """One text encoder folder of a pipeline, validated: its transformers config dict, tensor count and bytes."""

    name: str
    folder: Path
    config: dict[str, Any]
    tensors: int
    nbytes: int

    def leaves(self, on_tensor: Callable[[str, np.ndarray], None] | None = None) -> Iterator[Leaf]:
        """The params' (path, fp32 array) leaves, one stacked param at a time."""
        return encoder_leaves(self.folder, dtype=np.float32, on_tensor=on_tensor)[1]


def plan_text_encoders(src: Path) -> tuple[list[TextEncoderSource], dict[str, Path], dict[str, list]]:
    """(encoders, tokenizer folders by name, model_index.json classes) of pipeline folder `src`: every key and
    shape checked against the encoder's config.json (the refusals of io.transformers_folder), no tensor data read."""
    missing = [n for n in REQUIRED if not (src / n).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src}: no {missing[0]}/ folder; --components {TEXT_ENCODERS} needs text_encoder/, "
                                "text_encoder_2/, their tokenizer/, tokenizer_2/ (T5's text_encoder_3/, tokenizer_3/ "
                                f"optional). Drop {TEXT_ENCODERS} from --components.")
    t5 = [(src / n).is_dir() for n in ("text_encoder_3", "tokenizer_3")]
    if t5[0] != t5[1]:
        raise FileNotFoundError(f"{src}: has {'text_encoder_3' if t5[0] else 'tokenizer_3'}/ but no "
                                f"{'tokenizer_3' if t5[0] else 'text_encoder_3'}/; T5 needs both.")
    names = [n for n in ENCODERS if (src / n).is_dir()]
    sources = []
    for name in names:
        folder = src / name
        encoder_leaves(folder)  # validates the config and every key and shape; reads no tensor data
        files = [SafetensorsFile(f) for f in weight_files(folder)]
        count = sum(len(st.keys()) for st in files)
        nbytes = sum(int(np.prod(st.shape(k), dtype=np.int64)) * st.dtype(k).itemsize for st in files for k in st.keys())  # noqa: SIM118
        sources.append(TextEncoderSource(name, folder, json.loads((folder / "config.json").read_text()), count,
                                         nbytes))
    tokenizers = {t: src / t for t in TOKENIZERS if (src / t).is_dir()}
    index = json.loads((src / "model_index.json").read_text()) if (src / "model_index.json").is_file() else {}
    classes = {p: index[p] for p in (*names, *tokenizers) if isinstance(index.get(p), list) and index[p][0]}
    return sources, tokenizers, classes
