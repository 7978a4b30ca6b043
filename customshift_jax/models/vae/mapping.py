"""diffusers `AutoencoderKL` state dict <-> our VAE params, key for key with no lookup table.

A flax path ('decoder', 'up_blocks', '0', 'resnets', '1', 'conv1', 'kernel') is the torch key
`decoder.up_blocks.0.resnets.1.conv1.weight`; conv kernels go (O, I, kh, kw) <-> (kh, kw, I, O), linear
kernels (out, in) <-> (in, out), norm `weight` <-> `scale`. Both directions are exact (transposes only).
Old checkpoints whose mid-block attention uses `query/key/value/proj_attn` must go through diffusers'
loader first (`AutoencoderKL.from_pretrained(...).state_dict()` renames them).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.model import param_shapes
from customshift_jax.tree_paths import named_leaves

Params = dict[str, Any]
_SHOW = 20  # keys listed per category in an error, before "... and N more"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_OLD_ATTENTION = (".query.", ".key.", ".value.", ".proj_attn.")


def _torch_key(path: tuple[str, ...]) -> str:
    """('encoder', 'conv_in', 'kernel') -> 'encoder.conv_in.weight'."""
    return ".".join((*path[:-1], _LEAF_TO_TORCH[path[-1]]))


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    """flax -> torch: conv (kh, kw, I, O) -> (O, I, kh, kw); dense (in, out) -> (out, in); vectors unchanged."""
    if a.ndim == 4:
        return np.transpose(a, (3, 2, 0, 1))
    if a.ndim == 2:
        return np.transpose(a, (1, 0))
    return a


def _to_flax_layout(a: np.ndarray) -> np.ndarray:
    """torch -> flax: conv (O, I, kh, kw) -> (kh, kw, I, O); linear (out, in) -> (in, out); vectors unchanged."""
    if a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))
    if a.ndim == 2:
        return np.transpose(a, (1, 0))
    return a


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_torch_layout(np.empty(flax_shape, np.bool_)).shape


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as numpy, same dtype and bits (bf16 via ml_dtypes)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor; torch is already imported then
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _listing(title: str, items: list[str]) -> str:
    shown = "\n  ".join(items[:_SHOW])
    more = f"\n  ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def _check(what: str, expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key (first 20 of each, then a count)."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    wrong = sorted(f"{k}: got {got[k]}, expected {expected[k]}" for k in expected
                   if k in got and tuple(got[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = [f"{what} does not match the VAE config"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if wrong:
        parts.append(_listing("wrong shapes", wrong))
    if any(any(s in k for s in _OLD_ATTENTION) for k in unexpected):
        parts.append("hint: keys like 'mid_block.attentions.0.query' are the old attention names; load the checkpoint "
                     "with diffusers' AutoencoderKL.from_pretrained and pass its state_dict() (it renames them to to_q/...)")
    raise ValueError("\n".join(parts))


def vae_params_from_state_dict(config: VAEConfig, state_dict: Mapping[str, Any]) -> Params:
    """diffusers AutoencoderKL state dict (torch tensors or arrays) -> our params pytree of jax arrays.

    Every key must be used and every param filled; dtypes are kept (cast afterwards if wanted)."""
    shapes = param_shapes(config)
    expected = {_torch_key(p): _torch_shape(s) for p, s in shapes.items()}
    arrays = {str(k): _as_numpy(v) for k, v in state_dict.items()}
    _check("state dict", expected, {k: tuple(a.shape) for k, a in arrays.items()})
    params: Params = {}
    for path in shapes:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(_to_flax_layout(arrays[_torch_key(path)])))
    return params


def vae_state_dict_from_params(config: VAEConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> diffusers AutoencoderKL state dict of contiguous numpy arrays (for safetensors export).

    Exact inverse of `vae_params_from_state_dict`; a params tree of the wrong structure is a ValueError."""
    if set(params) == {"params"}:  # tolerate flax's {'params': ...} variables wrapper
        params = params["params"]
    shapes = param_shapes(config)
    flat = dict(named_leaves(params))
    expected = {"/".join(p): s for p, s in shapes.items()}
    _check("params tree", expected, {"/".join(p): tuple(np.shape(v)) for p, v in flat.items()})
    return {_torch_key(p): np.ascontiguousarray(_to_torch_layout(np.asarray(flat[p]))) for p in shapes}
