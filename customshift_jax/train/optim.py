"""optax AdamW with warm-up then cosine or constant, global-norm clipping and gradient accumulation."""
from __future__ import annotations

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
                   clip_norm: float | None = 1.0, accum_steps: int = 1) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
    """(optimizer, lr schedule). With `accum_steps` > 1 the update is applied every `accum_steps` calls
    (optax.MultiSteps: gradients are averaged, params unchanged in between); schedule counts updates."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
    sched = make_lr_schedule(lr, warmup_steps, schedule, total_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    opt = optax.chain(*parts)
    if accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accum_steps)
    return opt, sched
