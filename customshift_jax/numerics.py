"""The project's numbers: the parity measure (DESIGN section 7), shared by tests, benchmarks and `crosscheck`, and
the float dtypes every flag, config and builder names."""
from __future__ import annotations

import ml_dtypes
import numpy as np

# The one table of dtype names: each flag and config key takes either spelling.
FLOAT_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32), "float32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def float_dtype(name: str, what: str = "dtype") -> np.dtype:
    """The numpy dtype a name stands for ("fp32" / "float32", "bf16" / "bfloat16"); another name is an error
    naming `what` (the flag or argument the user typed)."""
    try:
        return FLOAT_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(FLOAT_DTYPES)}.") from None


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
