"""Content hashes of what we write: one per checkpoint params piece (over its leaves' paths, dtypes, shapes and
bytes, so it is computed from the arrays as they are written and re-computed from the arrays restored) and one
per file of tensors. sha256: hardware-accelerated, about 1.7 GB/s a core here (blake2b 0.8); leaves are hashed
on a few threads (hashlib releases the GIL), and a piece is hashed while orbax writes it."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHM = "sha256"
HASHES_KEY = "hashes"  # in a component's marker entry: {piece name: "sha256:<hex>"}
_THREADS = max(1, min(8, os.cpu_count() or 1))


class DamagedCheckpoint(ValueError):
    """Stored bytes that are not what was written: the message names the piece or file and both hashes."""


def _leaf_digest(path: tuple[str, ...], leaf: Any) -> bytes:
    array = np.ascontiguousarray(leaf)
    h = hashlib.new(ALGORITHM)
    h.update(json.dumps(["/".join(path), array.dtype.name, list(array.shape)]).encode())
    h.update(memoryview(array.reshape(-1).view(np.uint8)))
    return h.digest()


def leaves_hash(leaves: Iterable[tuple[tuple[str, ...], Any]]) -> str:
    """"sha256:<hex>" of (path, array) leaves, independent of their order (leaves are hashed by path)."""
    leaves = sorted(leaves, key=lambda item: item[0])
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        digests = list(pool.map(lambda item: _leaf_digest(*item), leaves))
    h = hashlib.new(ALGORITHM)
    for digest in digests:
        h.update(digest)
    return f"{ALGORITHM}:{h.hexdigest()}"


def tensors_hash(tensors: Mapping[str, Any]) -> str:
    """"sha256:<hex>" of a {name: array} file of tensors (keys as paths of one element)."""
    return leaves_hash(((name,), value) for name, value in tensors.items())


def file_hash(path: str | Path, chunk: int = 16 << 20) -> str:
    """"sha256:<hex>" of a file's bytes, read in chunks."""
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"{ALGORITHM}:{h.hexdigest()}"


def check_hash(expected: str, found: str, what: str, fix: str = "re-run `customshift convert`") -> None:
    """Raise DamagedCheckpoint when `found` differs from the recorded `expected` hash."""
    if expected != found:
        raise DamagedCheckpoint(f"{what} is damaged: its content hash is {found}, the marker records {expected}; "
                                f"{fix} (or pass --no-verify / verify=False to load it anyway).")


def warn_unverified(what: str, log: Callable[[str], None] | None = None) -> None:
    """One line saying that `what` carries no content hashes (written before we recorded them): loaded unchecked."""
    (log or (lambda msg: print(msg, file=sys.stderr)))(
        f"warning: {what} records no content hashes (written by an older customshift-jax); loading it unverified. "
        "Re-run `customshift convert` to add them.")
