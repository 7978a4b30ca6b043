"""A pytree's leaves by name: a jax key path as the string keys along it (the models, sharding, checkpoints)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def key_names(path: Any) -> tuple[str, ...]:
    """The keys along a jax key path as strings (dict keys, attribute names, sequence indices), e.g.
    ("transformer_blocks", "attn", "to_q", "kernel")."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(key names, leaf) of every leaf of `tree`, in jax's flattening order."""
    return [(key_names(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def shape_mismatches(expected: Any, got: Any, limit: int = 6) -> list[str]:
    """How the tree `got` differs from `expected` in leaf names and shapes: "missing a/b", "unexpected a/c",
    "a/d has shape (2, 3), expected (3, 2)" (at most `limit` lines); empty when they match."""
    want = {"/".join(k): tuple(np.shape(v)) for k, v in named_leaves(expected)}
    have = {"/".join(k): tuple(np.shape(v)) for k, v in named_leaves(got)}
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, expected {v}" for k, v in want.items() if k in have and have[k] != v]
    return problems[:limit]
