"""Training progress as log lines, for runs whose output is not a terminal (nohup, SLURM): no bar to redraw."""
from __future__ import annotations

import time
from typing import Any, Callable


class LossLines:
    """A line `step S/T: loss L, R steps/s` at the first step, then every `every_s` seconds, and at the last."""

    def __init__(self, total: int, start: int, every_s: float, log: Callable[[str], Any],
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.every_s, self.log, self.clock = total, every_s, log, clock
        self.t_last, self.n_last, self.said = clock(), start, False

    def update(self, step: int, loss: float) -> None:
        now = self.clock()
        if self.said and now - self.t_last < self.every_s and step != self.total:
            return
        rate = (step - self.n_last) / max(now - self.t_last, 1e-9)
        self.log(f"step {step}/{self.total}: loss {loss:.4f}, {rate:.2f} steps/s")
        self.t_last, self.n_last, self.said = now, step, True
