"""diffusers state dict <-> our params: a key maps to a key by rule, not by a lookup table.

Rules: the param path is the diffusers key split on "."; `weight` becomes `kernel` (Linear transposed
(out, in) -> (in, out), Conv (O, I, kh, kw) -> (kh, kw, I, O)) or `scale` (norms); block i of
`transformer_blocks` lives in its group "a:b" under `scan`, stacked at index i - a.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from customshift_jax.models.mmdit.api import param_shapes
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.tree_paths import named_leaves

Params = dict[str, Any]
LIST_LIMIT = 20


class StateDictMismatch(ValueError):
    """A state dict that does not fit the expected architecture; the message names the keys."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), *, limit: int = LIST_LIMIT):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        parts = [f"{what} does not match the expected architecture."]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.misshaped)):
            if items:
                shown = ", ".join(items[:limit])
                more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {shown}{more}.")
        super().__init__(" ".join(parts))


def to_numpy(value) -> np.ndarray:
    """numpy view of a numpy, jax or torch array (torch bf16 goes through float32, exactly)."""
    if hasattr(value, "detach"):  # torch, imported lazily by whoever made it
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _leaf_to_torch(name: str) -> str:
    return "weight" if name in ("kernel", "scale") else name


def _torch_to_leaf(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernel" and array.ndim == 2:
        return array.T
    if name == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _leaf_from_flax(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernel" and array.ndim == 2:
        return array.T
    if name == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if name == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _parse_group(name: str) -> tuple[int, int]:
    start, stop = name.split(":")
    return int(start), int(stop)


def torch_keys_for_path(path: tuple[str, ...]) -> list[str]:
    """The diffusers keys of one param path; a scanned path names one key per stacked layer."""
    leaf = _leaf_to_torch(path[-1])
    if path[0] == "transformer_blocks":
        start, stop = _parse_group(path[1])
        rest = ".".join(path[3:-1] + (leaf,))
        return [f"transformer_blocks.{i}.{rest}" for i in range(start, stop)]
    return [".".join(path[:-1] + (leaf,))]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers key `config` expects and its torch shape, in order; nothing is allocated."""
    out: dict[str, tuple[int, ...]] = {}
    for path, spec in named_leaves(param_shapes(config)):
        layer_shape = spec.shape[1:] if path[0] == "transformer_blocks" else spec.shape
        for key in torch_keys_for_path(path):
            out[key] = _torch_shape(path[-1], layer_shape)
    return out


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    shape = getattr(state_dict, "shape", None)  # LazyStateDict-style: shape from the header, no read
    return tuple(shape(key)) if callable(shape) else tuple(state_dict[key].shape)


def fill_tiled(target: np.ndarray, source: np.ndarray, cast: Callable, dtype: Any, tile: int = 512) -> None:
    """target[...] = cast(source): a large 2-D source (a transposed view) goes tile by tile, which keeps the
    strided reads in cache (about 2x faster than one strided copy) and bounds the cast's temporary."""
    if source.ndim != 2 or source.size < (1 << 20):
        target[...] = cast(source, dtype)
        return
    rows, cols = source.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            target[i:i + tile, j:j + tile] = cast(source[i:i + tile, j:j + tile], dtype)


def params_from_state_dict(
    config: MMDiTConfig,
    state_dict: Mapping[str, Any],
    *,
    dtype: Any = np.float32,
    what: str = "the transformer state dict",
    cast: Callable[[np.ndarray, Any], np.ndarray] | None = None,
    on_tensor: Callable[[str, Any], None] | None = None,
) -> Params:
    """Map a diffusers `SD3Transformer2DModel` state dict onto our params (numpy, `dtype`).

    Every key must be used and every param filled with the right shape, else `StateDictMismatch`
    names the missing, unexpected and mis-shaped keys; that check runs before anything is read or
    allocated. `state_dict` may be lazy (values read on access): each stacked param is preallocated and
    filled layer by layer, so at most one source tensor is live besides the result. `on_tensor(key,
    value)` runs after each source tensor has been copied (progress, releasing memory-mapped pages).
    """
    check_state_dict(config, state_dict, what)
    params: Params = {}
    for path, array in iter_params(config, state_dict, dtype, cast, on_tensor):
        _set(params, path, array)
    return params


def check_state_dict(config: MMDiTConfig, state_dict: Mapping[str, Any],
                     what: str = "the transformer state dict") -> None:
    """Raise `StateDictMismatch` (naming the keys) unless `state_dict` has exactly the keys and shapes
    `config` expects; reads no tensor (a lazy state dict's shapes come from its header)."""
    expected = state_dict_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    misshaped = []
    for key, want in expected.items():
        if key in state_dict:
            got = _shape_of(state_dict, key)
            if got != want:
                misshaped.append(f"{key} {got} (expected {want})")
    unexpected = sorted(set(state_dict.keys()) - set(expected))
    if missing or unexpected or misshaped:
        raise StateDictMismatch(f"{what} (expected {describe(config)})", missing, unexpected, misshaped)


def iter_params(config: MMDiTConfig, state_dict: Mapping[str, Any], dtype: Any = np.float32,
                cast: Callable[[np.ndarray, Any], np.ndarray] | None = None,
                on_tensor: Callable[[str, Any], None] | None = None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """`params_from_state_dict` one param at a time, as (path, array), for streaming writers: each is
    filled from its per-layer source tensors and dropped here once yielded. Run `check_state_dict` first."""
    cast = cast or (lambda a, dt: np.asarray(a, dtype=dt))
    for path, spec in named_leaves(param_shapes(config)):
        scanned = path[0] == "transformer_blocks"
        out = np.empty(spec.shape, dtype)
        for j, key in enumerate(torch_keys_for_path(path)):
            value = state_dict[key]
            fill_tiled(out[j] if scanned else out, _torch_to_leaf(path[-1], to_numpy(value)), cast, dtype)
            if on_tensor is not None:
                on_tensor(key, value)
            del value
        yield path, out
        del out  # the consumer owns it now


def state_dict_views(config: MMDiTConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> a diffusers state dict of numpy views (transposed, not copied), in natural key order.

    For streaming writers; `state_dict_from_params` is the same with contiguous copies.
    """
    out: dict[str, np.ndarray] = {}
    for path, leaf in named_leaves(params):
        array = np.asarray(leaf)
        keys = torch_keys_for_path(path)
        layers = array if path[0] == "transformer_blocks" else [array]
        if len(layers) != len(keys):
            raise ValueError(f"param {'/'.join(path)} has {len(layers)} layers, expected {len(keys)}.")
        for key, layer in zip(keys, layers):
            out[key] = _leaf_from_flax(path[-1], layer)
    return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def state_dict_from_params(config: MMDiTConfig, params: Params) -> dict[str, np.ndarray]:
    """The inverse mapping: our params -> a diffusers state dict of numpy arrays (exact, no casting)."""
    return {key: np.ascontiguousarray(view) for key, view in state_dict_views(config, params).items()}


def _natural_key(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def describe(config: MMDiTConfig) -> str:
    """One line naming the architecture, for error messages."""
    dual = config.dual_attention_layers
    return (f"MMDiT with {config.num_layers} layers, {config.num_attention_heads} heads x "
            f"{config.attention_head_dim}, qk_norm={config.qk_norm}, "
            f"dual attention in {list(dual) if dual else 'no'} layers, patch {config.patch_size}, "
            f"pos_embed_max_size {config.pos_embed_max_size}")


def iter_torch_keys(config: MMDiTConfig) -> Iterable[str]:
    """All diffusers keys the config expects, in order."""
    for path, _ in named_leaves(param_shapes(config)):
        yield from torch_keys_for_path(path)
