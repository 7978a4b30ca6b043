"""Exact resume: a run interrupted by SIGTERM (at a seeded random step) and by kill -9, resumed each time,
ends with bit-identical LoRA params, beta and optimizer state to an uninterrupted 20-step run (CPU)."""
from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import ROOT, start_trainer, write_synthetic_dataset

CONFIG = ROOT / "train" / "configs" / "tiny.yaml"
STEPS = 20


def _wait_for_step(proc, metrics: Path, step: int, timeout: float = 600) -> int:
    """Poll the metrics log until it reports `step` or more; returns the step seen."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists():
            lines = [l for l in metrics.read_text().splitlines() if l.strip().endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError("trainer too slow")


def _final(out: Path) -> dict:
    from customshift_jax.train.loop import final_trainable

    return final_trainable(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return write_synthetic_dataset(tmp / "data"), tmp / "xla-cache", tmp


def test_exact_resume_after_sigterm_and_kill9(setup):
    data, cache, tmp = setup
    common = (f"data.path={data}", f"train.steps={STEPS}", "checkpoint.every=4", "log.every=1")
    straight = tmp / "straight"
    p = start_trainer(CONFIG, *common, f"output_dir={straight}", cache_dir=cache, log=tmp / "straight.log",
                      sleep_per_step=0.3)
    assert p.wait(600) == 0, (tmp / "straight.log").read_text()[-3000:]

    run = tmp / "interrupted"
    # 1) SIGTERM at a seeded random step: a clean exit with a checkpoint at the step boundary.
    term_step = random.Random(7).randint(3, 9)
    p = start_trainer(CONFIG, *common, f"output_dir={run}", cache_dir=cache, log=tmp / "a.log", sleep_per_step=0.3)
    _wait_for_step(p, run / "metrics.jsonl", term_step)
    p.send_signal(signal.SIGTERM)
    assert p.wait(300) == 0, (tmp / "a.log").read_text()[-3000:]
    assert "SIGTERM: saved step" in (tmp / "a.log").read_text()

    # 2) resume, then kill -9 once it is past step 12 (it loses the steps after its last periodic checkpoint).
    p = start_trainer(CONFIG, *common, f"output_dir={run}", cache_dir=cache, resume=True, log=tmp / "b.log",
                      sleep_per_step=0.3)
    _wait_for_step(p, run / "metrics.jsonl", 13)
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    assert "resumed from step" in (tmp / "b.log").read_text()

    # 3) resume to the end.
    p = start_trainer(CONFIG, *common, f"output_dir={run}", cache_dir=cache, resume=True, log=tmp / "c.log",
                      sleep_per_step=0.3)
    assert p.wait(600) == 0, (tmp / "c.log").read_text()[-3000:]

    a, b = _final(straight), _final(run)
    assert a["step"] == b["step"] == STEPS
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"leaf {k} differs after resume")
    assert (run / "lora" / "customshift_cgb.safetensors").is_file()
    # metrics.jsonl: every step once, in order, after the kill -9 and its resume (case 17)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps


def test_ctrl_c_saves_and_says_how_to_resume(setup):
    """SIGINT (Ctrl-C) saves at the step boundary like SIGTERM, instead of losing the steps since the last save."""
    data, cache, tmp = setup
    run = tmp / "ctrl-c"
    p = start_trainer(CONFIG, f"data.path={data}", f"train.steps={STEPS}", "checkpoint.every=1000", "log.every=1",
                      f"output_dir={run}", cache_dir=cache, log=tmp / "ctrl-c.log", sleep_per_step=0.3)
    seen = _wait_for_step(p, run / "metrics.jsonl", 2)
    p.send_signal(signal.SIGINT)
    assert p.wait(300) == 0, (tmp / "ctrl-c.log").read_text()[-3000:]
    text = (tmp / "ctrl-c.log").read_text()
    assert "SIGINT: saved step" in text and "--resume" in text, text[-2000:]
    saved = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and seen <= saved[-1] < STEPS, saved


def test_metrics_lines_are_whole_and_a_resume_cuts_the_steps_it_runs_again(tmp_path, monkeypatch):
    """Case 17: a full disk left a torn line no JSON reader parses, and a resume after kill -9 repeated the rolled
    back steps. A line is now written whole or cut back off; a resume from step k cuts the lines after k (and any
    torn one) before appending."""
    import os

    from customshift_jax.train import metrics as metrics_mod
    from customshift_jax.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 0.5})
    real_write = os.write
    monkeypatch.setattr(metrics_mod.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError, match="only .* bytes written"):
        logger.log(4, {"loss": 0.25})  # the disk fills mid-line
    monkeypatch.setattr(metrics_mod.os, "write", real_write)
    logger.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3] and text.endswith("\n")

    with open(tmp_path / "metrics.jsonl", "a") as f:  # as an older version left it: a torn line, then more steps
        f.write('{"step": 4, "lo\n{"step": 5, "loss": 1.0}\n{"step": 6, "loss"')
    resumed = MetricsLogger(tmp_path, tensorboard=False, resumed_at=2)  # the checkpoint it resumes from: step 2
    assert resumed.cut == 4
    resumed.log(3, {"loss": 0.125})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
