"""Temporary folders of our atomic writes, and what a killed run leaves of them.

A write into DST works in `.DST.partial-<id>/` holding OWNER_FILE (pid, host): a later write of the same DST
finds the ones whose process is dead, says how large they are, and removes them. A folder of that name without
OWNER_FILE is not ours and is left alone. `--overwrite` moves the old DST to `.DST.replaced-<id>/` (owner file
added) before deleting it. SIGINT / SIGTERM during a write are deferred to the next safe point (`StopSignals`),
so the write unwinds through its cleanup instead of dying inside orbax's background threads."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

OWNER_FILE = ".customshift-partial.json"
KINDS = ("partial", "replaced")


def temp_name(dst: Path, kind: str) -> Path:
    """The temporary sibling `.DST.<kind>-<id>` of `dst`."""
    return dst.parent / f".{dst.name}.{kind}-{uuid.uuid4().hex[:8]}"


def claim(folder: Path, dst: Path) -> None:
    """Mark `folder` as ours, in use by this process (written before anything else goes in)."""
    (folder / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "dst": str(dst)}) + "\n")


def unclaim(folder: Path) -> None:
    """Drop the owner file (just before `folder` becomes DST: the file is not part of the result)."""
    with contextlib.suppress(FileNotFoundError):
        (folder / OWNER_FILE).unlink()


def remove_tree(folder: Path) -> None:
    """Delete `folder`, its owner file last: a kill midway leaves a folder still recognised as ours."""
    for child in list(folder.iterdir()) if folder.is_dir() else []:
        if child.name == OWNER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
    unclaim(folder)
    with contextlib.suppress(OSError):
        folder.rmdir()


def name_some(paths: list[Path], root: Path, limit: int = 5) -> str | None:
    """The first `limit` of `paths` relative to `root`, then "and N more", for messages; None when none."""
    if not paths:
        return None
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(str(p.relative_to(root)) for p in paths[:limit]) + more


def _owner(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / OWNER_FILE).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep_stale(dst: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporary folders of `dst` that earlier, dead runs of ours left; say so. Returns them."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    removed = []
    for kind in KINDS:
        for folder in sorted(dst.parent.glob(f".{dst.name}.{kind}-*")):
            owner = _owner(folder) if folder.is_dir() and not folder.is_symlink() else None
            if owner is None or owner.get("host") != socket.gethostname() or _alive(owner["pid"]):
                continue  # not ours, or in use
            if kind == "replaced" and not dst.exists():
                log(f"note: {folder} holds the {dst.name} that an interrupted --overwrite moved aside, and {dst} is "
                    f"missing; rename it back to {dst} to keep it.")
                continue
            size = _size(folder)
            remove_tree(folder)
            log(f"note: removed {folder} ({size / 1e6:.1f} MB), left by an interrupted run (pid {owner['pid']}).")
            removed.append(folder)
    return removed


class StopSignals:
    """Defer SIGINT / SIGTERM to `check()` calls at safe points (between tensors and pieces); a second signal
    stops at once. Installed only in the main thread (elsewhere it is a no-op)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signum

    def check(self) -> None:
        """Raise KeyboardInterrupt when a signal came since the block began."""
        if self.received is not None:
            raise KeyboardInterrupt(signal.Signals(self.received).name)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old.clear()


@contextlib.contextmanager
def atomic_directory(dst: str | Path, check: Callable[[Path], None] = lambda d: None,
                     log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a new temporary directory beside `dst` (ours, by its owner file); when the block succeeds, rename
    it to `dst`. Stale temporary folders of `dst` from dead runs are removed first.

    `check(dst)` runs just before the rename and may refuse. An existing `dst` is moved aside, the new one
    renamed in, then the old one deleted; on any failure (an interrupt included) the temporary directory is
    removed, `dst` is left as it was, and an interrupt says what was removed.
    """
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dst, log)
    tmp = temp_name(dst, "partial")
    tmp.mkdir()
    claim(tmp, dst)
    try:
        yield tmp
        check(dst)
        unclaim(tmp)
        if dst.exists():
            old = temp_name(dst, "replaced")
            os.rename(dst, old)
            claim(old, dst)
            try:
                os.rename(tmp, dst)
            except OSError:
                unclaim(old)
                os.rename(old, dst)
                raise
            remove_tree(old)
        else:
            os.rename(tmp, dst)
    except KeyboardInterrupt as e:
        if tmp.exists():
            remove_tree(tmp)
        raise KeyboardInterrupt(f"removed partial {tmp}") from e
    finally:
        if tmp.exists():
            remove_tree(tmp)
