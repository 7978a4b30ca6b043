"""Read safetensors files tensor by tensor through a memory map, without torch (bf16 via ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header of {name: dtype, shape, data_offsets},
then the raw bytes. Reading by hand keeps peak memory at one tensor and lets us name what is broken.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from customshift_jax.io.safe_files import atomic_write

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: the message names the file and what is wrong."""


class SafetensorsFile:
    """A read-only view of one .safetensors file; `get(name)` returns a memory-mapped numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes).")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8:
                    raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size "
                                           f"({size} bytes): the file is truncated or not safetensors.")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"{self.path}: no such file.") from None
            raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e}).") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise SafetensorsError(f"{self.path}: the header describes {self._data_start + end} bytes but the file "
                                   f"has {size}: the file is truncated. Re-download or re-export it.")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}.")
        return DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only numpy array backed by the file (no copy)."""
        entry = self._entries[name]
        start, stop = entry["data_offsets"]
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        if (stop - start) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{self.path}: tensor {name!r} has {stop - start} bytes for shape {shape} {dtype}.")
        raw = self._mmap[self._data_start + start:self._data_start + stop]
        return raw.view(dtype).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write numpy arrays (bf16 included) as a safetensors file, streaming one tensor at a time."""
    header: dict = {}
    offset = 0
    for name, arr in tensors.items():
        dt = np.dtype(arr.dtype)
        if dt not in DTYPE_NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dt} to safetensors.")
        nbytes = dt.itemsize * int(np.prod(arr.shape, dtype=np.int64))
        header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with atomic_write(path, what="safetensors") as f:  # never through a link; readers never see half a file
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def safetensors_files(folder: str | Path, name: str) -> list[Path]:
    """The files holding a folder's weights: the shards `name`.index.json names, else `name` itself (as diffusers
    and transformers save them). A missing shard, a broken index or only PyTorch `.bin` files are errors naming
    the folder and what to do."""
    folder = Path(folder)
    index = folder / f"{name}.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {e}; "
                             "re-save the model") from e
        if not names:
            raise ValueError(f"{index}: an empty weight_map; expected a sharded safetensors index.")
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{folder}: shards {absent} named in {index.name} are missing")
        return [folder / n for n in names]
    if (folder / name).is_file():
        return [folder / name]
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {found}: re-save it with safe_serialization=True)" if found else ""
    raise FileNotFoundError(f"{folder}: no {name} or {index.name}{hint}")
