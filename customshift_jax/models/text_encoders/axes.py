"""Logical axes of the Flax text encoders' params, by module name (the MMDiT's axis names, so its rule sets apply).

q/k/v (embed, heads), out (heads, embed), MLP in (embed, mlp), MLP out (mlp, embed), token tables (None, embed);
the scanned layers get a leading "layers" axis; norms and the relative-position table stay whole. Given to
`parallel.sharding.param_shardings(params, mesh, rules, text_logical_axes)`, the wrapper every model's params use.
"""
from __future__ import annotations

from collections.abc import Sequence

_KERNELS: dict[str, tuple[str | None, str | None]] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "q", "k", "v"), ("embed", "heads")),
    **dict.fromkeys(("out_proj", "o"), ("heads", "embed")),
    **dict.fromkeys(("fc1", "wi_0", "wi_1"), ("embed", "mlp")),
    **dict.fromkeys(("fc2", "wo"), ("mlp", "embed")),
    "text_projection": ("embed", None),
}
_TABLES = ("token_embedding", "position_embedding", "shared")
_STACKED = ("layers", "block")  # the scanned modules of CLIP and T5


def text_logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of one text-encoder param from its path (e.g. `text_model/encoder/layers/fc1/kernel`)."""
    path = tuple(str(p) for p in path)
    lead: tuple[str | None, ...] = ("layers",) if any(p in _STACKED for p in path) else ()
    rank = len(shape) - len(lead)
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    axes: tuple[str | None, ...] = (None,) * rank
    if module in _KERNELS and leaf == "kernel" and rank == 2:
        axes = _KERNELS[module]
    elif module in _KERNELS and leaf == "bias" and rank == 1:
        axes = (_KERNELS[module][1],)
    elif module in _TABLES and leaf == "embedding" and rank == 2:
        axes = (None, "embed")
    return lead + axes
