"""Faults of the machine are one line (issue 15): a full disk or a file size limit during convert prints one
`error:` line and no orbax / asyncio tracebacks (about 190 lines before); `--debug` shows the traceback."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

from test_checked_numbers import generate_argv

from customshift_jax.cli.faults import fault_message
from customshift_jax.cli.main import main

# A child whose files may not grow past the limit: writes fail with EFBIG, as on a full disk. SIGXFSZ is ignored
# (else the kernel kills the writer instead of failing the write); both survive the exec. A trampoline, not
# preexec_fn: no Python runs between fork and exec in this multithreaded (JAX) process.
LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000)); os.execv(sys.executable, sys.argv[1:])")


def _convert(src, dst, env=None):
    return subprocess.run([sys.executable, "-c", LIMITED, sys.executable, "-m", "customshift_jax.cli.main", "convert",
                           str(src), str(dst)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_full_disk_during_convert_is_one_line(tiny_pipeline_dir, tmp_path):
    r = _convert(tiny_pipeline_dir, tmp_path / "ckpt")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: a file grew past the size limit") and "File too large" in lines[0]
    assert not (tmp_path / "ckpt").exists()
    debug = _convert(tiny_pipeline_dir, tmp_path / "ckpt2", env={"CUSTOMSHIFT_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_fault_messages_name_the_fault_and_the_file():
    full = fault_message(OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/x"))
    assert full.startswith("the disk is full") and full.endswith("(No space left on device: /data/ckpt/x).")
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "a/0": Failed writing: "/d/ckpt/f": Failed to write 9 '
                             "bytes to file 15: No space left on device [os_error_code='28']")
    assert fault_message(tensorstore) == ("the disk is full: free space (or choose a destination on another disk) "
                                          "and run it again (No space left on device: /d/ckpt/f).")
    assert fault_message(ValueError("--gamma must be finite")) is None
    assert fault_message(OSError(errno.ENOENT, "No such file")) is None  # a user's path: said as it is


def test_generate_refuses_a_link_planted_in_out(tiny_checkpoint_dir, embeds_with_subject, tmp_path, capsys):
    """The row seen: links planted in `generate --out` were written through, outside the folder."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "000_00.png").symlink_to(victim)
    code = main(generate_argv(tiny_checkpoint_dir, embeds_with_subject, out))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: image path") and "000_00.png is a symbolic link" in lines[-1]
    assert "Traceback" not in "".join(lines)
    assert victim.read_text() == "precious"


def test_training_log_lines_clear_the_bar_first(capsys):
    """The row seen: progress bars ran into the next log line. A message while the bar shows clears it first
    (the bar's line is blanked with a carriage return), is printed on its own line, and the bar is redrawn."""
    from tqdm import tqdm

    from customshift_jax.train.loop import log_above_bar

    bar = tqdm(total=3, file=sys.stderr, ascii=True, ncols=60)
    bar.update(1)
    bar.refresh()
    before = capsys.readouterr().err
    log_above_bar(print)("saved step 1")
    out = capsys.readouterr()
    bar.close()
    assert "1/3" in before and out.out == "saved step 1\n"
    parts = [part for part in out.err.split("\r") if part]
    assert parts[0].strip() == "" and len(parts[0]) >= 40 and "1/3" in parts[-1], repr(out.err)
