"""What a `customshift train` run shows and leaves when its output is not a terminal (nohup, SLURM): loss lines
as it goes, and LoRA files as readable as every other output."""
from __future__ import annotations

import stat
import subprocess

from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset


def test_train_off_a_terminal_prints_loss_lines_and_exports_0644(tmp_path):
    """Case 22: off a terminal only the last two lines were printed; now a loss line every log.line_every_s
    seconds (here every step). Case 23: the exported LoRA files were 0600 under umask 022; now 0644."""
    data = write_synthetic_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cmd = trainer_cmd(ROOT / "train" / "configs" / "tiny.yaml", f"data.path={data}", f"output_dir={out}",
                      "train.steps=3", "checkpoint.every=3", "log.line_every_s=1e-9", "log.tensorboard=false")
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True,
                       timeout=600, umask=0o022)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    said = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in said] == ["step 1/3", "step 2/3", "step 3/3"], r.stdout
    assert all(" loss " in line and "steps/s" in line for line in said), said
    files = sorted((out / "lora").iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files), \
        [(f.name, oct(f.stat().st_mode)) for f in files]
    assert stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o644
