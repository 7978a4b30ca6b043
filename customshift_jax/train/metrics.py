"""Metrics: a JSONL log and TensorBoard event files written directly (no tensorboard package needed).

The event writer emits TFRecord-framed `Event` protos (hand-encoded: wall_time, step, Summary of simple
scalar values or PNG images), which TensorBoard reads as scalars and images.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from customshift_jax.io.safe_files import atomic_write, make_dir, open_append, refuse_link


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int | None = None, summary: bytes | None = None,
           file_version: str | None = None) -> bytes:
    msg = _field(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        msg += _field(2, 0) + _varint(step)
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if summary is not None:
        msg += _bytes_field(5, summary)
    return msg


def _scalar_summary(values: dict[str, float]) -> bytes:
    out = b""
    for tag, v in values.items():
        value = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v))
        out += _bytes_field(1, value)
    return out


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image.")
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def _image_summary(images: dict[str, bytes]) -> bytes:
    out = b""
    for tag, png in images.items():
        h, w = png_size(png)
        image = _field(1, 0) + _varint(h) + _field(2, 0) + _varint(w) + _field(3, 0) + _varint(3) + _bytes_field(4, png)
        out += _bytes_field(1, _bytes_field(1, tag.encode()) + _bytes_field(4, image))
    return out


class EventWriter:
    """Append-only TensorBoard event file in `logdir` (events.out.tfevents.<time>.<host>)."""

    def __init__(self, logdir: str | Path):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = make_dir(logdir, "TensorBoard folder") / name
        self.f = open_append(self.path, what="TensorBoard event")
        self._write(_event(time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self.f.write(header + struct.pack("<I", _masked(crc32c(header))) + data
                     + struct.pack("<I", _masked(crc32c(data))))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(_event(time.time(), step, _scalar_summary(values)))
        self.f.flush()

    def images(self, step: int, images: dict[str, bytes]) -> None:
        """PNG images (encoded bytes) by tag, RGB."""
        self._write(_event(time.time(), step, _image_summary(images)))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_events(path: str | Path, images: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Parse events back (for tests): [(step, {tag: scalar})], with `images` [(step, {tag: PNG bytes})]
    instead; checks every CRC."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        assert struct.unpack_from("<I", data, i + 8)[0] == _masked(crc32c(data[i:i + 8]))
        body = data[i + 12:i + 12 + n]
        assert struct.unpack_from("<I", data, i + 12 + n)[0] == _masked(crc32c(body))
        i += 16 + n
        step, values = _parse_event(body, images)
        if values:
            out.append((step, values))
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        yield num, v


def _parse_event(b: bytes, images: bool = False) -> tuple[int, dict[str, Any]]:
    step, values = 0, {}
    for num, v in _fields(b):
        if num == 2:
            step = v
        elif num == 5:
            for _, value in _fields(v):
                tag, val = None, None
                for n2, v2 in _fields(value):
                    if n2 == 1:
                        tag = v2.decode()
                    elif n2 == 2 and not images:
                        val = struct.unpack("<f", v2)[0]
                    elif n2 == 4 and images:
                        val = dict(_fields(v2))[4]  # Summary.Image.encoded_image_string
                if tag is not None and val is not None:
                    values[tag] = val
    return step, values


class MetricsLogger:
    """Both sinks: `OUT/metrics.jsonl` (one JSON object a line, each written whole or not at all) and TensorBoard
    events under `OUT/tb`. `resumed_at`: the step training goes on from; lines after it (steps rolled back with the
    checkpoint) and a torn line (a crash or a full disk mid-write) are cut before appending, see `cut_metrics`."""

    def __init__(self, out: str | Path, tensorboard: bool = True, resumed_at: int = 0):
        out = make_dir(out, "output_dir")
        self.cut = cut_metrics(out / METRICS_NAME, resumed_at)
        self.jsonl = open_append(out / METRICS_NAME, "ab", what="metrics")
        self.tb = EventWriter(out / "tb") if tensorboard else None

    def log(self, step: int, values: dict[str, float]) -> None:
        line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
        append_whole(self.jsonl.fileno(), line.encode())
        if self.tb is not None:
            self.tb.scalars(step, values)

    def images(self, step: int, images: dict[str, bytes]) -> None:
        """PNG images by tag to TensorBoard (the files themselves are written by the caller)."""
        if self.tb is not None:
            self.tb.images(step, images)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


METRICS_NAME = "metrics.jsonl"


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the O_APPEND file `fd` in one write; a short or failed write (a full disk) is cut back off,
    so the file never ends in a torn line, and raised."""
    before = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        raise


def _line_step(line: bytes) -> int | None:
    """The step of a whole metrics line, or None for a torn or foreign one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def cut_metrics(path: Path, after: int) -> int:
    """Keep the whole lines of `path` up to step `after` (the resumed checkpoint's; 0 for a fresh run): a torn
    line and the lines of steps after it, which a resume runs again, are cut (atomically). Returns how many."""
    if not path.exists():
        return 0
    lines = refuse_link(path, "metrics").read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith(b"\n") and (_line_step(line) or 0) <= after
            and _line_step(line) is not None]
    if len(kept) != len(lines):
        with atomic_write(path, "wb", what="metrics") as f:
            f.write(b"".join(kept))
    return len(lines) - len(kept)
