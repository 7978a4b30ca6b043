"""`customshift train` on an 8-device mesh (fsdp_tp: LoRA, Adam moments and base laid out by the rules) trains
the same LoRAs as the unsharded run, and a sharded run resumes from its sharded checkpoint to the same result."""
from __future__ import annotations

import subprocess

import numpy as np

from conftest import rel_err
from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset
from train.loop import final_trainable

MESH = ("mesh.enabled=true", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp")


def _train(tmp_path, run: str, steps: int, *extra: str, resume: bool = False) -> None:
    cmd = trainer_cmd(ROOT / "train" / "configs" / "tiny.yaml", f"data.path={tmp_path / 'data'}",
                      f"output_dir={tmp_path / run}", f"train.steps={steps}", "data.global_batch=4",
                      "checkpoint.every=2", "log.tensorboard=false", *extra, resume=resume)
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
    worst = max(rel_err(mesh[k], plain[k]) for k in plain if k != "step")
    assert worst <= 1e-5, worst
