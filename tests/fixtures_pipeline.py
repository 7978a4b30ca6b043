"""Session-scoped tiny SD3 pipeline folders for tests: `from fixtures_pipeline import tiny_pipeline_dir, ...`."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline folder with all three text encoders, built once per session."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir_no_text(tmp_path_factory) -> Path:
    """The same without text encoders/tokenizers (null in model_index.json)."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3_notext") / "pipe", with_text_encoders=False, seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_pipe(tiny_pipeline_dir):
    """The diffusers StableDiffusion3Pipeline loaded from `tiny_pipeline_dir` (fp32, CPU)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_pipeline_dir` converted to our checkpoint by `customshift convert`, once per session."""
    from customshift_jax.cli.main import main

    dst = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["convert", str(tiny_pipeline_dir), str(dst)]) == 0
    return dst


def write_embeds_with_subject(pipeline_dir: Path, folder: Path) -> Path:
    """An --embeds .npz of two dog prompts (with negatives) and the subject's embeddings, encoded once by the tiny
    pipeline's text encoders, so that generate needs none."""
    import numpy as np

    from customshift_jax.text import TextEncoders

    encoders = TextEncoders.from_pretrained(pipeline_dir)
    prompts = encoders.encode(["a dog on the beach", "a dog in the snow"], max_sequence_length=16)
    subject = encoders.encode(["dog"], max_sequence_length=16, do_classifier_free_guidance=False)
    path = folder / "with_subject.npz"
    np.savez(path, **prompts.arrays(), subject_embeds=subject.prompt_embeds,
             subject_pooled_embeds=subject.pooled_prompt_embeds)
    return path
