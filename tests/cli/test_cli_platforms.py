"""The CLI on a machine with libtpu installed but no TPU: no libtpu start-up errors, the CPU as platform; a
JAX_PLATFORMS the user set is kept."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from customshift_jax.cli.platforms import tpu_attached

SCRIPT = ("import os, sys\n"
          "from customshift_jax.cli.platforms import quiet_absent_tpu\n"
          "quiet_absent_tpu()\n"
          "import jax\n"
          "print(os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)\n")


def run_script(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**base, **env})


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or tpu_attached(),
                    reason="needs libtpu installed and no TPU attached")
def test_no_tpu_runs_on_the_cpu_without_libtpu_errors():
    result = run_script()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TPU_WORKER_HOSTNAMES" not in result.stderr and "libtpu" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "cpu"


def test_jax_platforms_set_by_the_user_wins():
    result = run_script(JAX_PLATFORMS="cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cpu", "cpu"]
