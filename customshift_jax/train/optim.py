"""optax AdamW with warm-up then cosine or constant, global-norm clipping, per-leaf learning-rate scales and
gradient accumulation."""
from __future__ import annotations

import jax
import optax


def make_lr_schedule(lr: float, warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
                  final_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps` optimizer updates, then "constant" or "cosine" decay."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}; expected 'constant' or 'cosine'.")
    if schedule == "cosine":
        if total_steps <= warmup_steps:
            raise ValueError(f"a cosine schedule needs total_steps ({total_steps}) > warmup_steps ({warmup_steps}).")
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), total_steps,
                                                  end_value=lr * final_lr_fraction)
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                [warmup_steps])


def make_optimizer(lr: float = 1e-4, *, warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
                   weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, accum_steps: int = 1,
                   lr_scale_by_name: dict[str, float] | None = None) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """(optimizer, lr schedule). With `accum_steps` > 1 the update is applied every `accum_steps` calls
    (optax.MultiSteps: gradients are averaged, params unchanged in between); schedule counts updates.
    `lr_scale_by_name`: leaves named so (the last key of their path, e.g. "beta") learn at lr x their scale."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
    sched = make_lr_schedule(lr, warmup_steps, schedule, total_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    if lr_scale_by_name and any(v != 1.0 for v in lr_scale_by_name.values()):
        parts.append(scale_leaves_by_name(lr_scale_by_name))
    opt = optax.chain(*parts)
    if accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accum_steps)
    return opt, sched


def scale_leaves_by_name(scales: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the update of every leaf whose last path key is in `scales` by its scale (after AdamW: the leaf's
    own learning rate, lr x scale); other leaves pass unchanged. Stateless, so checkpoints keep their layout."""
    def update(updates, state, params=None):
        del params

        def scaled(path, u):
            name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
            return u * scales[name] if name in scales else u

        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
