"""Tiny SD3 pipeline folders and loaded pipelines for the sampler tests: `from fixtures_sampler import ...`.

Folders have no text encoders (the sampler tests pass precomputed embeddings), so they build fast.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# An SD3.5-medium-shaped tiny transformer: dual-attention blocks 0-1, qk RMS norm, 4 layers.
SD35M_TINY = {"num_layers": 4, "dual_attention_layers": [0, 1], "qk_norm": "rms_norm"}
DYNAMIC_SHIFT = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _load(path: Path):
    """diffusers' StableDiffusion3Pipeline from `path` (fp32, CPU), progress bar off."""
    from customshift_jax.testing import load_pipeline

    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sampler_sd3m_dir(tmp_path_factory) -> Path:
    """Tiny sd3-medium-shaped pipeline (3 plain layers), null text encoders."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sampler_sd3m") / "pipe", with_text_encoders=False, seed=0)


@pytest.fixture(scope="session")
def sampler_sd35m_dir(tmp_path_factory) -> Path:
    """Tiny sd3.5-medium-shaped pipeline (dual attention 0-1, qk rms_norm, 4 layers), null text encoders."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sampler_sd35m") / "pipe", transformer_config=SD35M_TINY,
                               with_text_encoders=False, seed=1)


@pytest.fixture(scope="session")
def sampler_dynamic_dir(sampler_sd3m_dir, tmp_path_factory) -> Path:
    """A copy of the sd3-medium folder whose scheduler config turns on resolution-dependent (dynamic) shifting."""
    path = tmp_path_factory.mktemp("sampler_dynamic") / "pipe"
    shutil.copytree(sampler_sd3m_dir, path)
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **DYNAMIC_SHIFT}, indent=2))
    return path


@pytest.fixture(scope="session")
def sd3m_pipe(sampler_sd3m_dir):
    return _load(sampler_sd3m_dir)


@pytest.fixture(scope="session")
def sd35m_pipe(sampler_sd35m_dir):
    return _load(sampler_sd35m_dir)


@pytest.fixture(scope="session")
def dynamic_pipe(sampler_dynamic_dir):
    return _load(sampler_dynamic_dir)
