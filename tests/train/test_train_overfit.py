"""`customshift train` overfits one batch of the tiny shape: over 200 steps (no dropout, no flip) the mean loss
of the last 20 steps is well below that of the first 20 (the loss is noisy: each step draws new timesteps)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset


def test_loss_falls_on_one_batch(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n=2)
    run = tmp_path / "run"
    cmd = trainer_cmd(ROOT / "train" / "configs" / "tiny.yaml", f"data.path={data}", f"output_dir={run}",
                      "data.global_batch=2", "data.flip_prob=0", "train.steps=200", "train.text_dropout=0",
                      "train.ref_dropout=0", "checkpoint.every=200", "log.every=1", "log.tensorboard=false")
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = np.array([row["loss"] for row in rows if "loss" in row])
    assert loss.shape == (200,) and np.all(np.isfinite(loss))
    first, last = loss[:20].mean(), loss[-20:].mean()
    print("loss by 20-step window:", np.round(loss.reshape(10, 20).mean(1), 3))
    assert last < 0.75 * first, (first, last)
