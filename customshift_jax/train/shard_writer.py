"""Prepared shards written as records arrive: each array streams row by row into its shard's .npy file, so a
shard of 1024 records (at SD3 width about 11 GB of text embeddings) never sits in memory; `count` rows finish a
shard, and a shard's files appear under their names only when it is whole."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from customshift_jax.io.safe_files import atomic_write, make_dir, refuse_link, write_text
from customshift_jax.train.shard_digests import DIGESTS_NAME, bytes_hash, row_digest

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(shape: tuple[int, ...], length: int | None = None) -> bytes:
    """A float32 .npy (format 1.0) header for `shape`, padded with spaces to `length` bytes (default: the next
    multiple of 64), so a shard's header can be rewritten in place with its final row count."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    size = length or -(-(len(_MAGIC) + 2 + len(text) + 1) // 64) * 64
    pad = size - len(_MAGIC) - 2 - len(text) - 1
    if pad < 0:
        raise ValueError(f"the .npy header of {shape} does not fit in {length} bytes")
    return _MAGIC + (size - len(_MAGIC) - 2).to_bytes(2, "little") + text + b" " * pad + b"\n"


class _OpenShard:
    """One shard being written: a temp file per array beside its final name, each with a header for the full
    shard, rows appended in order; `finish` fixes the row count and renames, `abandon` removes the temp files."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], capacity: int):
        self.folder, self.rows, self.files = folder, 0, {}
        self.digests: list[bytes] = []  # per row, every array's digest in sorted name order
        self.headers = {k: len(npy_header((capacity, *s))) for k, s in shapes.items()}
        self.shapes = shapes
        try:
            for k, s in shapes.items():
                refuse_link(folder / f"{k}.npy", "shard")
                fd, tmp = tempfile.mkstemp(prefix=f".{k}.npy.", suffix=".tmp", dir=folder)
                self.files[k] = (tmp, os.fdopen(fd, "wb"))
                self.files[k][1].write(npy_header((capacity, *s)))
        except BaseException:
            self.abandon()
            raise

    def append(self, arrays: dict[str, np.ndarray], start: int, stop: int) -> None:
        rows = {k: np.ascontiguousarray(arrays[k][start:stop], np.float32) for k in self.files}
        for k, (_, f) in self.files.items():
            f.write(rows[k].tobytes())
            f.flush()  # the batch is on its way to disk, not held in a buffer
        self.digests += [b"".join(row_digest(rows[k][i]) for k in sorted(rows)) for i in range(stop - start)]
        self.rows += stop - start

    def finish(self) -> dict:
        """Close the shard; its index entry's checksum fields: the arrays' order and the row digests' hash."""
        digests = b"".join(self.digests)
        with atomic_write(self.folder / DIGESTS_NAME, "wb", what="shard checksums") as out:
            out.write(digests)
        for k, (tmp, f) in self.files.items():
            f.seek(0)
            f.write(npy_header((self.rows, *self.shapes[k]), self.headers[k]))
            f.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, refuse_link(self.folder / f"{k}.npy", "shard"))
        self.files = {}
        return {"arrays": sorted(self.shapes), "digests": bytes_hash(digests)}

    def abandon(self) -> None:
        for tmp, f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if self.files:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / DIGESTS_NAME).unlink()
        self.files = {}


class ShardWriter:
    """Append records' arrays; every `shard_size` rows finish one shard folder `<prefix>NNNNN` of .npy files.
    Memory holds one batch, not a shard. `close` writes the index; `discard` removes every shard it wrote."""

    def __init__(self, out: str | Path, shard_size: int = 1024, prefix: str = "shard-", name: str | None = None):
        if shard_size < 1:
            raise ValueError(f"--shard-size {shard_size}: expected at least 1 record per shard.")
        self.out, self.shard_size, self.prefix = make_dir(out, "prepare's OUT"), shard_size, prefix
        self.name = name  # the one shard's folder name, when the writer writes a single shard (a prepare block)
        self.shards: list[dict] = []
        self._open: _OpenShard | None = None
        self._name = ""
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Rows of every array (all with the same count and, batch after batch, the same names and row shapes)."""
        shapes = {k: tuple(np.shape(v)[1:]) for k, v in arrays.items()}
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"shard arrays changed from {self._shapes} to {shapes} between batches")
        counts = {len(v) for v in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"shard arrays have different row counts {sorted(counts)}")
        n, i = counts.pop(), 0
        while i < n:
            if self._open is None:
                if self.name is not None and self.shards:
                    raise ValueError(f"shard {self.name} is full ({self.shard_size} rows)")
                self._name = self.name or f"{self.prefix}{len(self.shards):05d}"
                self._open = _OpenShard(make_dir(self.out / self._name, "shard folder"), shapes, self.shard_size)
            take = min(n - i, self.shard_size - self._open.rows)
            self._open.append(arrays, i, i + take)
            i += take
            if self._open.rows == self.shard_size:
                self._finish()

    def _finish(self) -> None:
        checks = self._open.finish()
        self.shards.append({"dir": self._name, "count": self._open.rows, **checks})
        self._open = None

    def flush(self) -> list[dict]:
        """Finish the shard in progress (fewer rows than a full one); the shards written, in order."""
        if self._open is not None and self._open.rows:
            self._finish()
        return self.shards

    def close(self, meta: dict) -> Path:
        """Finish the last shard and write the index: the shards in order, their total count, and `meta`."""
        self.flush()
        return write_index(self.out, self.shards, meta)

    def abort(self) -> None:
        """Remove the shard in progress (its temp files and folder); finished shards stay."""
        if self._open is not None:
            self._open.abandon()
            self._open = None
            with contextlib.suppress(OSError):
                (self.out / self._name).rmdir()

    def discard(self) -> None:
        """Remove the shard in progress and every shard this writer finished (a run that stops keeps none)."""
        self.abort()
        for s in self.shards:
            shutil.rmtree(self.out / s["dir"], ignore_errors=True)
        self.shards = []


def write_index(out: Path, shards: list[dict], meta: dict) -> Path:
    """OUT/index.json: format version, total count, the shards in record order, and `meta`."""
    index = {"version": FORMAT_VERSION, "count": sum(s["count"] for s in shards), "shards": shards, **meta}
    return write_text(Path(out) / INDEX_NAME, json.dumps(index, indent=1), what="dataset index")
