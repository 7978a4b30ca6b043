"""Run our MMDiT and diffusers' on the same weights and inputs, and measure how far apart they are.

Used by `customshift crosscheck` and by the parity tests. Imports torch and diffusers lazily.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from customshift_jax.api import mmdit_apply
from customshift_jax.config import MMDiTConfig
from customshift_jax.mapping import params_from_state_dict
from customshift_jax.numerics import max_abs_error, relative_error

FORWARD_TOLERANCE = 1e-5  # DESIGN section 7


def random_diffusers_transformer(config: MMDiTConfig, seed: int = 0, dtype: str = "float32"):
    """A diffusers `SD3Transformer2DModel` with random weights: default init, 1-D params perturbed.

    Biases and norm scales get N(0, 0.1) noise so that a mapping mistake on them cannot hide behind
    zeros and ones; matrices keep PyTorch's default (fan-in scaled) init, a realistic scale.
    """
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config.to_diffusers_config())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return (model if dtype == "float32" else model.to(getattr(torch, dtype))).eval()


@dataclasses.dataclass
class ForwardInputs:
    """One set of forward inputs in diffusers' layout, as numpy float32."""

    hidden_states: np.ndarray  # (B, C, H, W)
    timestep: np.ndarray  # (B,)
    encoder_hidden_states: np.ndarray  # (B, M, joint_attention_dim)
    pooled_projections: np.ndarray  # (B, P)

    @classmethod
    def random(cls, config: MMDiTConfig, *, batch: int, height: int, width: int, seed: int = 0,
               text_len: int = 7) -> "ForwardInputs":
        rng = np.random.default_rng(seed)
        return cls(
            hidden_states=rng.standard_normal((batch, config.in_channels, height, width)).astype(np.float32),
            timestep=np.sort(rng.uniform(1.0, 999.0, size=batch)).astype(np.float32),
            encoder_hidden_states=rng.standard_normal((batch, text_len, config.joint_attention_dim)).astype(np.float32),
            pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)).astype(np.float32),
        )

    def torch(self, dtype: str = "float32") -> dict[str, Any]:
        import torch

        dt = getattr(torch, dtype)
        return dict(hidden_states=torch.from_numpy(self.hidden_states).to(dt),
                    timestep=torch.from_numpy(self.timestep).to(dt),
                    encoder_hidden_states=torch.from_numpy(self.encoder_hidden_states).to(dt),
                    pooled_projections=torch.from_numpy(self.pooled_projections).to(dt))


def torch_forward(model, inputs: ForwardInputs, skip_layers: Sequence[int] | None = None,
                  per_block: bool = False):
    """diffusers' sample (numpy float32), and with `per_block` the (x, c) after every block."""
    import torch

    captured: list[tuple[np.ndarray, np.ndarray | None]] = []
    hooks = []
    if per_block:
        def hook(_module, _args, output):
            c, x = output
            captured.append((x.float().numpy(), None if c is None else c.float().numpy()))
        hooks = [b.register_forward_hook(hook) for b in model.transformer_blocks]
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with torch.no_grad():
            out = model(**inputs.torch(dtype), skip_layers=list(skip_layers) if skip_layers else None).sample
    finally:
        for h in hooks:
            h.remove()
    return out.float().numpy(), captured


def jax_forward(config: MMDiTConfig, params, inputs: ForwardInputs, skip_layers: Sequence[int] | None = None,
                per_block: bool = False, dtype: Any = "float32"):
    """Our sample (numpy float32), and with `per_block` the (x, c) after every block (skipped ones too)."""
    from customshift_jax.api import as_dtype

    out = mmdit_apply(config, params, inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states,
                      inputs.pooled_projections, skip_layers, dtype=as_dtype(dtype), return_block_outputs=per_block)
    if not per_block:
        return np.asarray(out, np.float32), []
    sample, groups = out
    blocks = []
    for xs, cs in groups:
        for i in range(xs.shape[0]):
            blocks.append((np.asarray(xs[i], np.float32), np.asarray(cs[i], np.float32)))
    return np.asarray(sample, np.float32), blocks


@dataclasses.dataclass
class CrosscheckResult:
    """One row of the crosscheck table."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float
    tolerance: float
    per_block: list[tuple[int, float, float | None]] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel)) and self.rel <= self.tolerance


def crosscheck_model(name: str, config: MMDiTConfig, torch_model, *, batch: int, height: int, width: int,
                     seed: int = 0, skip_layers: Sequence[int] | None = None, per_block: bool = False,
                     params=None, tolerance: float = FORWARD_TOLERANCE) -> CrosscheckResult:
    """Map `torch_model`'s weights (unless `params` given), run both forwards, compare."""
    if params is None:
        params = jax.tree_util.tree_map(np.asarray, params_from_state_dict(config, torch_model.state_dict()))
    inputs = ForwardInputs.random(config, batch=batch, height=height, width=width, seed=seed)
    expected, torch_blocks = torch_forward(torch_model, inputs, skip_layers, per_block)
    actual, jax_blocks = jax_forward(config, params, inputs, skip_layers, per_block)
    rows = []
    if per_block:
        executed = [i for i in range(config.num_layers) if not (skip_layers and i in skip_layers)]
        for i, (tx, tc) in zip(executed, torch_blocks):
            jx, jc = jax_blocks[i]
            rows.append((i, relative_error(jx, tx), None if tc is None else relative_error(jc, tc)))
    return CrosscheckResult(name, tuple(actual.shape), max_abs_error(actual, expected),
                            relative_error(actual, expected), tolerance, rows)
