"""One writer per output folder: a lock file in the folder, held (flock) for as long as a run writes there.

A second run meets a one-line refusal naming the holder (pid, host, start time, command); the lock of a run that
died (kill -9, a lost machine) is released by the kernel with its process, so the next run takes it over, saying
whose it was. A folder the run made and left empty (it failed before writing anything) is removed on exit.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from customshift_jax.io.safe_files import refuse_link

LOCK_NAME = ".customshift.lock"


class FolderInUse(ValueError):
    """Another live run holds the folder's lock."""


def _holder_text(record: dict) -> str:
    """'pid 123 on host h, started 2026-01-01 10:00:00 UTC (customshift train ...)' from a lock's record."""
    if not record:
        return "a run that is just starting"
    command = f" ({record['command']})" if record.get("command") else ""
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}{command}"


def _read_record(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
        if len(data) > 1 << 20:  # a lock record is a line: anything larger is not one
            break
    try:
        record = json.loads(data.decode())
        return record if isinstance(record, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}


def _own_record() -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = " ".join(["customshift", *sys.argv[1:]])[:300] if sys.argv else ""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}


def _acquire(path: Path, folder: Path, what: str, log: Callable[[str], Any]) -> int:
    """An open descriptor of the lock file, flocked by this process; raises FolderInUse when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read_record(fd))
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another run: {holder}; wait for it to end, or choose another "
                              f"{what}.") from None
        except OSError as e:  # a file system without locks: say so, go on unguarded
            log(f"warning: {path} cannot be locked ({e.strerror}); nothing keeps a second run out of {folder}")
            return fd
        try:  # the holder may have removed the file between our open and our lock: lock the one at `path`
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first: what this run makes."""
    made = []
    for p in [folder, *folder.parents]:
        if p.exists() or p.is_symlink():
            break
        made.append(p)
    return made


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str, *, log: Callable[[str], Any] = print) -> Iterator[Path]:
    """Make `folder` if needed and hold its lock for the `with` block (`what` names it in messages: "output_dir").
    On exit the lock is removed; folders this call made are removed again when left empty (a run that failed)."""
    folder = refuse_link(Path(folder), what)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file; give a folder.")
    made = _missing_ancestors(folder.absolute())
    folder.mkdir(parents=True, exist_ok=True)
    path = refuse_link(folder / LOCK_NAME, "lock file")
    try:
        fd = _acquire(path, folder, what, log)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        earlier = _read_record(fd)
        if earlier:
            log(f"note: {folder} held the lock of a run that is no longer running ({_holder_text(earlier)}); "
                "taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_own_record()) + "\n").encode(), 0)
        os.fsync(fd)
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for p in made:
        try:
            p.rmdir()
        except OSError:  # not empty (the run wrote there), or gone
            return
