"""The logical axes of the MMDiT's params (DESIGN section 5), declared with the model: by the end of each
param's module path, as diffusers names the modules. Registered with `parallel.sharding`, which maps them onto
a mesh by rule sets."""
from __future__ import annotations

from typing import Sequence

from customshift_jax.parallel.sharding import register_param_axes

_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
# (in, out) logical axes of each linear, by the end of its module path (scan / group names removed).
_LINEARS: tuple[tuple[tuple[str, ...], tuple[str | None, str | None]], ...] = (
    *(((name,), ("embed", "heads")) for name in _QKV),
    (("to_out", "0"), ("heads", "embed")),
    (("to_add_out",), ("heads", "embed")),
    (("net", "0", "proj"), ("embed", "mlp")),
    (("net", "2"), ("mlp", "embed")),
    (("linear",), ("embed", "mlp")),  # AdaLN modulation (6 or 9 x width): split like an MLP
    (("linear_1",), (None, "embed")),  # timestep / pooled-text embedders
    (("linear_2",), ("embed", None)),
    (("context_embedder",), (None, "embed")),
    (("proj_out",), ("embed", None)),
    (("pos_embed", "proj"), (None, "embed")),  # patch conv (p, p, C, D): leading dims whole
)


def _from_blocks(path: tuple[str, ...]) -> tuple[str, ...]:
    """A block param's path from "transformer_blocks" on, dropping outer keys (e.g. "base", "cgb", an Adam state's "mu")."""
    return path[path.index("transformer_blocks"):] if "transformer_blocks" in path else path


def _module_path(path: Sequence[str]) -> tuple[str, ...]:
    """The module path of a param without the group name and `scan` of the stacked blocks."""
    path = _from_blocks(tuple(path))
    if path and path[0] == "transformer_blocks":
        path = path[:1] + tuple(p for p in path[2:] if p != "scan")
    return path


def _linear_axes(module: tuple[str, ...]) -> tuple[str | None, str | None] | None:
    for suffix, axes in _LINEARS:
        if module[-len(suffix):] == suffix:
            return axes
    return None


def mmdit_param_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of an MMDiT param (base or LoRA) from its path, e.g. `.../attn/to_q/kernel` -> (layers, embed,
    heads). Stacked block params get a leading "layers" axis; a param no rule here knows is replicated (all None).

    Keys before "transformer_blocks" are ignored, so nested trees ({"base": ..., "cgb": ...}, a train state's LoRA
    and Adam moments) get the same axes.
    """
    path = _from_blocks(tuple(path))
    shape = tuple(shape)
    lead = stacked_lead(path)
    rank = len(shape) - len(lead)
    leaf, module = path[-1], _module_path(path[:-1])
    if leaf == "pos_embed":  # the (1, m*m, D) position table
        axes: tuple[str | None, ...] = (None,) * (rank - 1) + ("embed",)
    elif leaf == "scale":  # RMSNorm over the head dim
        axes = (None,) * rank
    else:
        linear = _linear_axes(module)
        if linear is None:
            axes = (None,) * rank
        elif leaf == "kernel":
            axes = (None,) * (rank - 2) + linear
        elif leaf == "bias":
            axes = (linear[1],)
        elif leaf == "lora_A":
            axes = (linear[0], "lora")
        elif leaf == "lora_B":
            axes = ("lora", linear[1])
        else:
            axes = (None,) * rank
    if len(axes) != rank:
        axes = (None,) * rank
    return lead + axes


def stacked_lead(path: Sequence[str]) -> tuple[str, ...]:
    """("layers",) for a param of the stacked blocks (its path passes "transformer_blocks"), else ()."""
    return ("layers",) if "transformer_blocks" in tuple(path) else ()


register_param_axes("mmdit", mmdit_param_axes)
