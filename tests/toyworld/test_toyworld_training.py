"""The world's training path as a user runs it, on a few pairs: `customshift prepare` with the shipped tiny SD3
(its VAE and text encoders, at the T5 length it records), then a short base training (train.mode=base) and a short
CustomShift training, both through the real CLI with the world's configs, each recording that length."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from train_fixtures import ROOT, trainer_env

from customshift_jax.toyworld import world
from customshift_jax.toyworld.build import CONFIGS, write_pairs
from customshift_jax.toyworld.methods import WEIGHTS
from customshift_jax.toyworld.tiny_sd3 import IMAGE_SIZE, T5_MAX_LENGTH

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model").is_dir(), reason="no shipped world weights")


def _cli(tmp_path, *args: str) -> None:
    cmd = [sys.executable, "-m", "customshift_jax.cli.main", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_prepare_then_base_and_customshift_training_run(tmp_path):
    train_subjects, _ = world.split_subjects(0)
    manifest = write_pairs(tmp_path / "pairs", 8, seed=3, subjects=train_subjects)
    _cli(tmp_path, "prepare", str(manifest), str(tmp_path / "prepared"), "--checkpoint", str(WEIGHTS / "model"),
         "--text-encoders", str(WEIGHTS / "model"), "--size", str(IMAGE_SIZE), "--no-flip")  # T5 length: the record
    common = [f"data.path={tmp_path / 'prepared'}", "train.steps=2", "data.global_batch=4", "train.warmup_steps=0",
              "train.schedule=constant", "log.tensorboard=false", "log.progress=false", "checkpoint.every=2"]
    _cli(tmp_path, "train", "--config", str(CONFIGS / "world-base.yaml"), f"output_dir={tmp_path / 'base'}",
         f"model.checkpoint={WEIGHTS / 'model'}", *common)
    assert (tmp_path / "base" / "model" / "customshift_checkpoint.json").is_file()
    from customshift_jax.toyworld.base_probe import probe  # the run's checkpoint, read back and sampled

    rows = probe(tmp_path / "base", [2], [1.0, 3.0], subjects=2, contexts=1)
    assert [(r["step"], r["guidance"]) for r in rows] == [(2, 1.0), (2, 3.0)]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("silhouette", "scene", "position", "size"))
    _cli(tmp_path, "train", "--config", str(CONFIGS / "world-customshift.yaml"), f"output_dir={tmp_path / 'cs'}",
         f"model.checkpoint={tmp_path / 'base' / 'model'}", *common)
    assert sorted(p.name for p in (tmp_path / "cs" / "lora").iterdir()) == [
        "customshift_beta.safetensors", "customshift_cgb.safetensors", "customshift_rab.safetensors"]
    # The world's T5 length went from the shipped model's record through the data into both trained outputs.
    from customshift_jax.io.text_settings import checkpoint_text_settings, lora_text_settings

    assert checkpoint_text_settings(tmp_path / "base" / "model").settings.max_sequence_length == T5_MAX_LENGTH
    assert lora_text_settings(tmp_path / "cs" / "lora").settings.max_sequence_length == T5_MAX_LENGTH
    # The base run moved the weights it started from.
    from customshift_jax.io.loading import load_transformer

    _, before = load_transformer(WEIGHTS / "model")
    _, after = load_transformer(tmp_path / "base" / "model")
    import jax

    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert any(jax.tree_util.tree_leaves(moved))
