"""`customshift train` on an 8-device mesh (fsdp_tp: LoRA, Adam moments and base laid out by the rules) trains
like the unsharded run, and a sharded run resumes from its sharded checkpoint to the same result.

Compared: what is well conditioned. The loss and gradient norm of every step, and Adam's moments (linear and
quadratic in the gradients), to 1e-5. Not the LoRA weights themselves: Adam's first step moves a weight by
lr g / (|g| + eps), and for gradients of a few eps that ratio turns the reduction order's round-off into 2e-5 on
one CPU and 1e-6 on another (the sharded run sums the gradient in another order)."""
from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
from conftest import rel_err
from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset

from customshift_jax.train.config import load_config
from customshift_jax.train.loop import build, final_trainable

MESH = ("mesh.enabled=true", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp")


def _overrides(tmp_path, run: str, steps: int) -> list[str]:
    return [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / run}", f"train.steps={steps}",
            "data.global_batch=4", "checkpoint.every=2", "log.tensorboard=false"]


def _train(tmp_path, run: str, steps: int, *extra: str, resume: bool = False) -> None:
    cmd = trainer_cmd(ROOT / "train" / "configs" / "tiny.yaml", *_overrides(tmp_path, run, steps), *extra,
                      resume=resume)
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_mesh_run_and_its_resume_equal_the_unsharded_run(tmp_path):
    write_synthetic_dataset(tmp_path / "data", n=8)
    _train(tmp_path, "plain", 4)
    _train(tmp_path, "mesh", 2, *MESH)
    _train(tmp_path, "mesh", 4, *MESH, resume=True)
    plain, mesh = final_trainable(tmp_path / "plain"), final_trainable(tmp_path / "mesh")
    assert plain.keys() == mesh.keys() and len(plain) > 0
    assert int(plain["step"]) == int(mesh["step"]) == 4
    # At step 0 every LoRA B, beta and Adam moment is zero (most leaves); after training only the leaves that
    # get no gradient stay zero (e.g. the RAB's output-side LoRAs: only its K/V reach the CGB).
    zero = [k for k, v in plain.items() if not np.any(v)]
    assert len(zero) < len(plain) / 4, f"{len(zero)} of {len(plain)} leaves still all zero: the run did not train"
    # Per step (the mesh run's log holds steps 1-2 from the first run and 3-4 from the resumed one).
    logs = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("plain", "mesh")]
    assert [m["step"] for m in logs[0]] == [m["step"] for m in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    # Adam's moments, found by their paths in the train state.
    state = build(load_config(ROOT / "train" / "configs" / "tiny.yaml", _overrides(tmp_path, "plain", 4))).state
    moments = [k for k in plain if "/mu/" in k or "/nu/" in k]
    assert len(moments) == 2 * len(jax.tree_util.tree_leaves(state.trainable))
    worst = max(rel_err(mesh[k], plain[k]) for k in moments)
    assert worst <= 1e-5, worst
