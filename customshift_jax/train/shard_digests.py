"""Checksums of prepared shards: a digest of every row of every array, kept in the shard's `row-digests.bin`,
whose own hash the index records; a record read for training is checked against its rows' digests, so altered,
swapped or damaged data stops the run, naming the shard, the file and the row, instead of training on it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

DIGESTS_NAME = "row-digests.bin"  # (rows, arrays, DIGEST_BYTES) uint8, arrays in the index entry's "arrays" order
DIGEST_BYTES = 16


class DamagedShard(ValueError):
    """Prepared data that is not what `customshift prepare` wrote."""


def row_digest(row: np.ndarray) -> bytes:
    """The digest of one record's array as float32 little-endian values (what training reads, whatever the
    .npy header claims)."""
    data = np.ascontiguousarray(row, dtype="<f4")
    return hashlib.sha256(memoryview(data.reshape(-1).view(np.uint8))).digest()[:DIGEST_BYTES]


def bytes_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_digests(folder: Path, entry: dict) -> np.ndarray | None:
    """The shard's row digests (rows, arrays, DIGEST_BYTES), checked against the index's hash of them; None for a
    shard written before checksums (no "digests" in its entry)."""
    if "digests" not in entry:
        return None
    path = folder / DIGESTS_NAME
    rows, arrays = int(entry["count"]), len(entry["arrays"])
    size = rows * arrays * DIGEST_BYTES
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise DamagedShard(f"{path} is missing (the index lists its checksum): the prepared data is damaged; run "
                           "`customshift prepare` again.") from None
    if len(data) != size or bytes_hash(data) != entry["digests"]:
        raise DamagedShard(f"{path} does not match its checksum in index.json: the prepared data is damaged; run "
                           "`customshift prepare` again.")
    return np.frombuffer(data, np.uint8).reshape(rows, arrays, DIGEST_BYTES)


def check_row(digests: np.ndarray | None, arrays: list[str], name: str, row: np.ndarray, j: int,
              folder: Path) -> None:
    """Raise DamagedShard when row `j` of array `name` differs from the digest written with it."""
    if digests is None:
        return
    if row_digest(row) != digests[j, arrays.index(name)].tobytes():
        raise DamagedShard(f"{folder / (name + '.npy')}: row {j} does not match its checksum (index.json, "
                           f"{DIGESTS_NAME}): the prepared data was altered or damaged; run `customshift prepare` "
                           "again.")
