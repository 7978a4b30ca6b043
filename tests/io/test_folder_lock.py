"""One writer per output folder: a second `customshift train` / `prepare` into a folder in use is refused in one
line naming the running process; the lock of a dead run is taken over with a note; a failed run leaves no folder."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from customshift_jax.cli.main import main
from customshift_jax.io.folder_lock import LOCK_NAME, FolderInUse, exclusive_folder

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
HOLD = ("import sys, time\nfrom customshift_jax.io.folder_lock import exclusive_folder\n"
        "with exclusive_folder(sys.argv[1], 'output_dir', log=lambda m: None):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a running `customshift train` does)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_second_train_into_a_folder_in_use_is_refused_naming_the_first(capsys, tmp_path):
    """Case 10: two runs into one output_dir both ran and interleaved their files; the second is now refused."""
    out = tmp_path / "run"
    first = _holder(out)
    try:
        line = _one_line_error(capsys, ["train", "--config", str(TINY), f"output_dir={out}",
                                        f"data.path={tmp_path / 'data'}"])
        assert f"{out} is in use by another run: pid {first.pid} on {socket.gethostname()}, started " in line, line
        assert "choose another output_dir" in line
        line = _one_line_error(capsys, ["prepare", str(tmp_path / "m.jsonl"), str(out), "--checkpoint", "ck",
                                        "--text-encoders", "te"])
        assert f"pid {first.pid}" in line and "choose another OUT" in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of the refused runs
    finally:
        first.kill()
        first.wait()


def test_the_lock_of_a_dead_run_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    dead = _holder(out)
    dead.send_signal(signal.SIGKILL)  # as kill -9: no cleanup, the record stays, the kernel frees the lock
    dead.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead.pid
    said = []
    with exclusive_folder(out, "output_dir", log=said.append):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()} on "):  # the same process again: still one writer
            with exclusive_folder(out, "output_dir"):
                pass
    assert len(said) == 1 and f"no longer running (pid {dead.pid} on" in said[0], said
    assert not (out / LOCK_NAME).exists() and out.is_dir()  # released; the folder it found is kept


def test_a_failed_train_leaves_no_empty_output_dir(capsys, tmp_path):
    """Case 25 (part): a bad data.path left an empty output_dir (and its parents) behind."""
    out = tmp_path / "runs" / "tiny"
    line = _one_line_error(capsys, ["train", "--config", str(TINY), f"output_dir={out}",
                                    f"data.path={tmp_path / 'no-data'}"])
    assert "no-data" in line
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["train", "--config", str(TINY), f"output_dir={tmp_path / 'kept'}",
                             f"data.path={tmp_path / 'no-data'}"])
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]  # a folder it did not make is kept
