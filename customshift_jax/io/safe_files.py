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


NPZ_MAX_BYTES = 16 << 30  # all members of an .npz of embeddings together, inflated (SD3: ~1500 prompts' worth)
NPZ_MAX_RATIO = 32  # float arrays compress little; a member inflating more than this past NPZ_RATIO_FLOOR is a bomb
NPZ_RATIO_FLOOR = 64 << 20


def _npz_members(path: Path, what: str, max_bytes: int) -> list[str]:
    """The member names of the .npz at `path`, checked from the zip directory and each .npy header before any
    array is read: sizes within `max_bytes` in all, no member inflating far beyond its stored size, each header
    saying no more bytes than its member holds."""
    import zipfile

    import numpy as np

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{what} {path} is not an .npz file ({e}); give an .npz written by numpy.savez.") from None
    with zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise ValueError(f"{what} {path} inflates to {total} bytes, above the limit of {max_bytes}; split it.")
        names = []
        for info in infos:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > NPZ_RATIO_FLOOR and ratio > NPZ_MAX_RATIO:
                raise ValueError(f"{what} {path}: member {info.filename} inflates from {info.compress_size} to "
                                 f"{info.file_size} bytes ({ratio:.0f}x), not an array of embeddings; refusing to "
                                 "read it.")
            try:
                with zf.open(info) as f:
                    fmt = np.lib.format
                    version = fmt.read_magic(f)
                    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                    stored = info.file_size - f.tell()  # the bytes after the header
            except Exception as e:  # noqa: BLE001 - numpy says "not a .npy" in many ways
                raise ValueError(f"{what} {path}: member {info.filename} is not a .npy array "
                                 f"({' '.join(str(e).split())}).") from None
            if dtype.hasobject:
                raise ValueError(f"{what} {path}: member {info.filename} holds pickled Python objects, which are not "
                                 "read; save plain numeric arrays.")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if nbytes > stored:
                raise ValueError(f"{what} {path}: member {info.filename}'s header says {shape} {dtype} ({nbytes} "
                                 f"bytes) but it holds {stored}: the file is damaged.")
            names.append(info.filename[:-4] if info.filename.endswith(".npy") else info.filename)
        return names


def read_npz(path: str | Path, what: str = ".npz file", max_bytes: int = NPZ_MAX_BYTES) -> dict[str, Any]:
    """{name: array} of the .npz at `path`, read only from a regular file whose zip directory and .npy headers
    promise bounded memory (`_npz_members`); every problem is one line naming `what` and the file."""
    import numpy as np

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file.") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "device"
        raise ValueError(f"{what} {path} is a {kind}, not a regular file; give an .npz file.")
    names = _npz_members(path, what, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in names}
    except Exception as e:  # noqa: BLE001 - a truncated or damaged member: zipfile, zlib and numpy errors
        raise ValueError(f"{what} {path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())}); the file "
                         "is damaged.") from None
