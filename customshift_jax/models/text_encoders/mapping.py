"""The text encoders' params <-> transformers state dicts: each param's transformers name (layers stacked under
`layers` / `block`, kernels transposed)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

T5_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """(transformers name with `{i}` for the layer index, whether the param is stacked) of one of our params."""
    if path == ("encoder", "relative_attention_bias", "embedding"):
        return T5_BIAS_KEY, False
    parts, stacked = [], False
    for p in path[:-1]:
        if p in ("layers", "block"):
            parts.append(p + ".{i}")
            stacked = True
        elif re.fullmatch(r"layer_\d+", p):
            parts.append("layer." + p.split("_")[1])
        else:
            parts.append(p)
    return ".".join(parts + [_LEAVES[path[-1]]]), stacked


def text_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The transformers state dict (views: kernels transposed back, stacked layers split) of one encoder's params."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        template, stacked = torch_key(keys)
        leaf = np.asarray(leaf)
        fix = (lambda a: a.T) if keys[-1] == "kernel" else (lambda a: a)
        if stacked:
            out.update({template.format(i=i): fix(leaf[i]) for i in range(leaf.shape[0])})
        else:
            out[template] = fix(leaf)
    return dict(sorted(out.items()))
