"""The logical axes of CustomShift's own param, beta (the learned shift, per head: (H,), or (layers, H) in the
stacked blocks), registered with `parallel.sharding` beside the MMDiT's (which knows nothing of beta)."""
from __future__ import annotations

from typing import Sequence

from customshift_jax.models.mmdit.axes import stacked_lead
from customshift_jax.parallel.sharding import register_param_axes

BETA = "beta"  # its name in the "lora" collection, at the attention's path (`.../attn/beta`)


def beta_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...] | None:
    """("heads",) for beta, after "layers" in the stacked blocks; None for any other param (the model's)."""
    path = tuple(path)
    if not path or path[-1] != BETA:
        return None
    lead = stacked_lead(path)
    rank = len(shape) - len(lead)
    return lead + (("heads",) if rank == 1 else (None,) * rank)


register_param_axes("customshift", beta_axes)
