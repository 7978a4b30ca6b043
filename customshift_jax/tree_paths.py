"""A pytree's leaves by name: a jax key path as the string keys along it (the models, sharding, checkpoints)."""
from __future__ import annotations

from typing import Any

import jax


def key_names(path: Any) -> tuple[str, ...]:
    """The keys along a jax key path as strings (dict keys, attribute names, sequence indices), e.g.
    ("transformer_blocks", "attn", "to_q", "kernel")."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(key names, leaf) of every leaf of `tree`, in jax's flattening order."""
    return [(key_names(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
