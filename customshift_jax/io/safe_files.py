"""File access that a planted path cannot misdirect. Writes never go through a link: a symlink at the path is
refused, temporary files are created exclusively (O_EXCL) beside their target, a finished file replaces its path
atomically. Reads are bounded: only regular files (a FIFO or /dev/zero is refused), at most a stated size."""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_link(path: str | Path, what: str = "output") -> Path:
    """`path` as a Path; a ValueError when a symbolic link sits at it (a link is never written through)."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{what} path {path} is a symbolic link (to {os.readlink(path)}); refusing to write "
                         "through it. Remove the link or choose another path.")
    return path


def make_dir(path: str | Path, what: str = "output folder") -> Path:
    """mkdir -p `path`, refusing a symlink at it (the folder a user typed may sit under links; its name may not)."""
    path = refuse_link(path, what)
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder; choose another path.")
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", what: str = "output") -> Iterator[IO]:
    """Write to an exclusively created temp file beside `path`, then rename it onto `path` (0644).

    A symlink at `path` is refused; a failure removes the temp file and leaves `path` as it was."""
    path = refuse_link(path, what)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are as readable as any other file
        refuse_link(path, what)  # a link planted while we wrote is still refused
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str, what: str = "output") -> Path:
    """`Path.write_text`, atomically and never through a link."""
    with atomic_write(path, "w", what) as f:
        f.write(text)
    return Path(path)


def open_append(path: str | Path, mode: str = "ab", what: str = "log") -> IO:
    """Open for appending (creating it if absent) without following a link at `path`."""
    path = refuse_link(path, what)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if path.is_symlink():
            refuse_link(path, what)
        raise OSError(e.errno, f"cannot open {what} file for appending: {e.strerror}", str(path)) from None
    return os.fdopen(fd, mode)


def save_image(image, path: str | Path, what: str = "image", **save_kw) -> Path:
    """A PIL image saved as PNG through `atomic_write` (PIL's own `save(path)` follows a link at the path)."""
    with atomic_write(path, what=what) as f:
        image.save(f, format="PNG", **save_kw)
    return Path(path)


def read_regular_file(path: str | Path, max_bytes: int, what: str, limit_flag: str,
                      opener: Callable[[str], Any] | None = None) -> bytes:
    """The bytes of `path`: FileNotFoundError when missing; ValueError for anything but a regular file or for more
    than `max_bytes` (naming `limit_flag`). `opener` (fsspec's) reads remote paths, still bounded."""
    if opener is None:
        path = Path(path)
        try:
            st = os.stat(path)  # follows a link: a link to a regular file is read like one
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} {path}: no such file.") from None
        if not stat.S_ISREG(st.st_mode):
            kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "device"
            raise ValueError(f"{what} {path} is a {kind}, not a regular file; give a file.")
        _check_size(path, st.st_size, max_bytes, what, limit_flag)
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        with opener(str(path)) as f:
            data = f.read(max_bytes + 1)
    _check_size(path, len(data), max_bytes, what, limit_flag)
    return data


def _check_size(path: Any, size: int, max_bytes: int, what: str, limit_flag: str) -> None:
    if size > max_bytes:
        raise ValueError(f"{what} {path} has more than {max_bytes} bytes, the limit ({limit_flag}); shrink the "
                         "file or raise the limit.")
