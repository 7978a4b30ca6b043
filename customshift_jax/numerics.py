"""The project's parity measure (DESIGN section 7), shared by tests, benchmarks and `crosscheck`."""
from __future__ import annotations

import numpy as np


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64; shapes must agree."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return float(np.max(np.abs(actual - expected))) / max(scale, 1e-30) if actual.size else 0.0


def max_abs_error(actual, expected) -> float:
    """max |actual - expected| in float64."""
    diff = np.asarray(actual, np.float64) - np.asarray(expected, np.float64)
    return float(np.max(np.abs(diff))) if diff.size else 0.0
