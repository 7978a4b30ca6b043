"""Run our MMDiT and diffusers' on the same weights and inputs, and measure how far apart they are.

Used by `customshift crosscheck` and by the parity tests. Imports torch and diffusers lazily.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from customshift_jax.io.safe_files import write_text
from customshift_jax.models.mmdit.api import mmdit_apply
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.mapping import params_from_state_dict
from customshift_jax.models.mmdit.options import as_dtype
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

    with capture_block_outputs(model, enabled=per_block) as captured:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with torch.no_grad():
            out = model(**inputs.torch(dtype), skip_layers=list(skip_layers) if skip_layers else None).sample
    return out.float().numpy(), captured


@contextlib.contextmanager
def capture_block_outputs(model, enabled: bool = True) -> Iterator[list[tuple[np.ndarray, np.ndarray | None]]]:
    """Record (x, c) after every executed block of a diffusers transformer while inside; c None after the last.

    Forward hooks on `model.transformer_blocks`, removed on exit; a skipped block records nothing.
    """
    captured: list[tuple[np.ndarray, np.ndarray | None]] = []

    def hook(_module, _args, output):
        c, x = output
        captured.append((x.detach().float().numpy(), None if c is None else c.detach().float().numpy()))

    hooks = [b.register_forward_hook(hook) for b in model.transformer_blocks] if enabled else []
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def flatten_block_outputs(groups) -> list[tuple[np.ndarray, np.ndarray]]:
    """Our per-group block outputs [(x (L_g, B, N, D), c (L_g, B, M, D))] -> per block (x, c), numpy float32."""
    blocks = []
    for xs, cs in groups:
        for i in range(xs.shape[0]):
            blocks.append((np.asarray(xs[i], np.float32), np.asarray(cs[i], np.float32)))
    return blocks


def block_errors(num_layers: int, skip_layers: Sequence[int] | None, jax_blocks, torch_blocks
                 ) -> list[tuple[int, float, float | None]]:
    """(block, image rel err, text rel err or None) for every executed block; torch records only those."""
    executed = [i for i in range(num_layers) if not (skip_layers and i in skip_layers)]
    rows = []
    for i, (tx, tc) in zip(executed, torch_blocks):
        jx, jc = jax_blocks[i]
        rows.append((i, relative_error(jx, tx), None if tc is None else relative_error(jc, tc)))
    return rows


def jax_forward(config: MMDiTConfig, params, inputs: ForwardInputs, skip_layers: Sequence[int] | None = None,
                per_block: bool = False, dtype: Any = "float32"):
    """Our sample (numpy float32), and with `per_block` the (x, c) after every block (skipped ones too)."""
    out = mmdit_apply(config, params, inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states,
                      inputs.pooled_projections, skip_layers, dtype=as_dtype(dtype), return_block_outputs=per_block)
    if not per_block:
        return np.asarray(out, np.float32), []
    sample, groups = out
    return np.asarray(sample, np.float32), flatten_block_outputs(groups)


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

    def rows(self) -> list["Row"]:
        """The forward and, with per-block errors, one row per block and stream (for `--json`)."""
        out = [Row(self.name, "forward", self.shape, self.max_abs, self.rel, self.tolerance)]
        for i, ex, ec in self.per_block:
            out.append(Row(self.name, f"block {i} image stream", (), float("nan"), ex, self.tolerance))
            if ec is not None:
                out.append(Row(self.name, f"block {i} text stream", (), float("nan"), ec, self.tolerance))
        return out


@dataclasses.dataclass
class Row:
    """One compared quantity of one model: its relative error against the reference and the bound it must meet."""

    name: str  # the model: a preset name or a folder
    quantity: str  # what was compared, e.g. "prefill K layer 2"
    shape: tuple[int, ...]
    max_abs: float  # nan where not recorded
    rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel)) and self.rel <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        """The row as plain JSON values; a number not recorded or not finite is null (JSON has no NaN)."""
        num = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
        return {"name": self.name, "quantity": self.quantity, "shape": list(self.shape),
                "max_abs_error": num(self.max_abs), "rel_error": num(self.rel), "tolerance": self.tolerance,
                "pass": self.passed}


def compare(name: str, quantity: str, actual, expected, tolerance: float) -> Row:
    """The row of `actual` (ours) against `expected` (the reference); shapes must agree."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return Row(name, quantity, tuple(actual.shape), max_abs_error(actual, expected),
               relative_error(actual, expected), tolerance)


def write_rows_json(path: str | Path, rows: Sequence[Row]) -> None:
    """Write {"passed": bool, "rows": [...]} for CI; the folder must exist."""
    lines = ",\n".join("  " + json.dumps(r.to_json()) for r in rows)  # one row per line: diffable
    passed = json.dumps(all(r.passed for r in rows))
    write_text(path, f'{{"passed": {passed}, "rows": [\n{lines}\n]}}\n', what="--json")


def crosscheck_model(name: str, config: MMDiTConfig, torch_model, *, batch: int, height: int, width: int,
                     seed: int = 0, skip_layers: Sequence[int] | None = None, per_block: bool = False,
                     params=None, tolerance: float = FORWARD_TOLERANCE) -> CrosscheckResult:
    """Map `torch_model`'s weights (unless `params` given), run both forwards, compare."""
    if params is None:
        params = jax.tree_util.tree_map(np.asarray, params_from_state_dict(config, torch_model.state_dict()))
    inputs = ForwardInputs.random(config, batch=batch, height=height, width=width, seed=seed)
    expected, torch_blocks = torch_forward(torch_model, inputs, skip_layers, per_block)
    actual, jax_blocks = jax_forward(config, params, inputs, skip_layers, per_block)
    rows = block_errors(config.num_layers, skip_layers, jax_blocks, torch_blocks) if per_block else []
    return CrosscheckResult(name, tuple(actual.shape), max_abs_error(actual, expected),
                            relative_error(actual, expected), tolerance, rows)
