"""Test-wide settings: 8 CPU devices, fp32 with the highest matmul precision, deterministic seeds."""
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from customshift_jax.numerics import relative_error as rel_err  # noqa: E402,F401

jax.config.update("jax_default_matmul_precision", "highest")

# DreamBench photos and prompts: ../shared beside the checkout (CI lays a copy there too).
DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


@pytest.fixture(autouse=True)
def _torch_seed():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
