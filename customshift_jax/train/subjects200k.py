"""Subjects200K's parquet shards read as training pairs, streamed shard by shard: `customshift prepare --format
subjects200k FOLDER OUT` consumes them exactly as it consumes a JSONL manifest's (Record, reference, target).

What is assumed of the data (Yuanshi/Subjects200K, from its dataset card and its authors' loaders; nothing here
downloads it). Columns of each `*.parquet` file under FOLDER (any depth, e.g. `data/train-00000-of-00NNN.parquet`):

    image               struct{bytes: binary (PNG/JPEG), path: string}  (the `datasets` Image feature; a plain
                        binary column is also read). A composite of the two views side by side.
    description         struct{item, description_0, description_1, category: string, description_valid: bool}
    collection          string ("collection_1", "collection_2"; "collection_3" is a separate 1024-px dataset)
    quality_assessment  struct{compositeStructure, objectConsistency, imageQuality: int64}, GPT-4o scores 0-5

Geometry: collections 1 and 2 are 1056 x 528 composites of two 512 x 512 views. The crop boxes are those of the
authors' own loader (github.com/Yuanshi9815/Subjects200K, dataset.py: `img_size = 512`, `padding = 8`) and of
OminiControl's training (src/train/data.py with train/config/subject_512.yaml's `padding: 8`): with padding p and
view v = height - 2p, left = (p, p, p + v, p + v), right = (v + 2p, p, 2v + 2p, p + v) in PIL (x0, y0, x1, y1),
i.e. (8, 8, 520, 520) and (528, 8, 1040, 520) at 1056 x 528. (The card's "16-pixel padding" is the 2 x 8 px around
the views; a border of 16 px around and between them would make 1072 x 544, which is not the shards' size.)

Pairs: the item is the subject name. Direction "left-to-right" is (reference: left view, target: right view,
caption: description_1); "both" (the default) adds (right view, left view, description_0), as OminiControl trains
on every row twice. Filters, with the defaults of the card's and OminiControl's filter: every quality score
>= `min_quality` (5; a row without scores fails it), `description_valid` not false, and optionally a set of
collections. Filtered rows are counted by reason, not as bad data; an unusable row (no subject or caption, an
image that does not decode or is too small for the two views) is a bad record named by file and row.

Streaming: rows are read with pyarrow's `iter_batches` over only the row groups that hold this process's share;
process p of P takes the contiguous global rows [p N / P, (p + 1) N / P) of the N rows of the sorted files.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.images import ImageLimits, decode_image, read_image_bytes
from customshift_jax.train.data import BadCounter, Record, center_crop_resize

QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
DIRECTIONS = ("both", "left-to-right")
COLUMNS = ("image", "description", "collection", "quality_assessment")
DEFAULT_LIMITS = ImageLimits()


@dataclasses.dataclass(frozen=True)
class Subjects200KOptions:
    """How rows are filtered and split (the `customshift prepare --format subjects200k` flags)."""

    min_quality: int = 5  # every score in QUALITY_KEYS must be >= this; 0 keeps every row
    collections: tuple[str, ...] | None = None  # None: all collections
    keep_invalid_descriptions: bool = False  # False drops rows whose description_valid is false
    directions: str = "both"
    padding: int = 8  # px around the views (see the module docstring)

    def __post_init__(self):
        if not 0 <= self.min_quality <= 5:
            raise ValueError(f"--min-quality {self.min_quality}: the scores are 0-5; give 0 (no filter) to 5.")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"--directions {self.directions}: expected one of {', '.join(DIRECTIONS)}.")
        if self.padding < 0:
            raise ValueError(f"--padding {self.padding}: expected a number of pixels >= 0.")
        if self.collections is not None and not self.collections:
            raise ValueError("--collections is empty: give comma-separated names such as collection_1,collection_2.")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("--format subjects200k reads parquet with pyarrow, which is not installed: "
                         "pip install pyarrow.") from e
    return pq


def find_parquet_files(folder: str | Path) -> list[Path]:
    """The sorted `*.parquet` files under `folder` (or `folder` itself when it is one)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".parquet":
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (expected a folder holding Subjects200K's parquet shards, "
                                "e.g. data/train-00000-of-00022.parquet).")
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no .parquet files (expected Subjects200K's shards, e.g. "
                                "data/train-00000-of-00022.parquet).")
    return files


def check_schema(path: Path, schema: Any, options: Subjects200KOptions) -> bool:
    """Refuse a file that lacks a column or struct field these options read, by name; True when
    description.description_valid exists (without it no row is filtered on it)."""
    import pyarrow as pa

    needed = {"image": "", "description": ""}
    if options.min_quality > 0:
        needed["quality_assessment"] = " (or pass --min-quality 0)"
    if options.collections is not None:
        needed["collection"] = " (or drop --collections)"
    names = schema.names
    for col, hint in needed.items():
        if col not in names:
            raise ValueError(f"{path}: no column '{col}'{hint}; it has {names}. Subjects200K's shards have "
                             f"{list(COLUMNS)}: is this a Subjects200K parquet file?")
    fields = {"description": ["item", "description_1"] + (["description_0"] if options.directions == "both" else [])}
    if options.min_quality > 0:
        fields["quality_assessment"] = list(QUALITY_KEYS)
    for col, want in fields.items():
        typ = schema.field(col).type
        have = [typ.field(i).name for i in range(typ.num_fields)] if pa.types.is_struct(typ) else []
        for name in want:
            if name not in have:
                raise ValueError(f"{path}: column '{col}' has no field '{name}' (type {typ}); Subjects200K's "
                                 f"'{col}' is a struct with {want}.")
    typ = schema.field("image").type
    if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
            or (pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0)):
        raise ValueError(f"{path}: column 'image' is {typ}; expected the `datasets` Image struct "
                         "{bytes, path} or binary image files.")
    desc = schema.field("description").type
    return desc.get_field_index("description_valid") >= 0


def split_views(img: Any, padding: int) -> tuple[Any, Any]:
    """(left view, right view) of a side-by-side composite (PIL image; boxes in the module docstring)."""
    w, h = img.size
    v = h - 2 * padding
    if v <= 0 or w < 2 * v + 2 * padding:
        raise ValueError(f"a {w}x{h} composite cannot hold two {v}x{v} views with {padding} px padding "
                         f"(it needs a width of at least {2 * v + 2 * padding}); check --padding")
    p = padding
    return img.crop((p, p, p + v, p + v)), img.crop((v + 2 * p, p, 2 * v + 2 * p, p + v))


def _image_bytes(value: Any, base: Path, limits: ImageLimits) -> bytes:
    """The encoded image of one `image` cell: its bytes, or the file its path names (relative to the shard), at
    most `limits.max_bytes` either way."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(value, dict) and not data and value.get("path"):
        path = Path(value["path"]) if Path(value["path"]).is_absolute() else base / value["path"]
        return read_image_bytes(path, limits)  # FileNotFoundError: counted as a missing image
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise FileNotFoundError("the image cell holds neither bytes nor a path")
    if len(data) > limits.max_bytes:
        raise ValueError(f"the image is {len(data)} bytes, above --max-image-bytes {limits.max_bytes}")
    return bytes(data)


class Subjects200KSource:
    """This process's share of the rows of a folder of Subjects200K parquet shards, filtered and split into pairs.

    The folder and every file's schema are checked when it is built (before any model loads); `pairs` streams."""

    def __init__(self, folder: str | Path, options: Subjects200KOptions | None = None, *,
                 process_index: int | None = None, process_count: int | None = None, batch_rows: int = 64,
                 log: Callable[[str], Any] = print):
        pq = _pyarrow_parquet()
        self.folder, self.options = Path(folder), options or Subjects200KOptions()
        self.batch_rows, self.log = batch_rows, log
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process {process_index} of {process_count}: expected 0 <= index < count.")
        self.files = find_parquet_files(folder)
        self.has_valid_flag, self.row_groups = {}, {}
        for f in self.files:
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a damaged footer
                raise ValueError(f"{f} is not a readable parquet file ({type(e).__name__}: {e}).") from e
            self.has_valid_flag[f] = check_schema(f, meta.schema.to_arrow_schema(), self.options)
            self.row_groups[f] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.total_rows = sum(sum(g) for g in self.row_groups.values())
        self.rows = (process_index * self.total_rows // process_count,
                     (process_index + 1) * self.total_rows // process_count)  # this process's [lo, hi)
        self.filtered: dict[str, int] = {}
        self.collections_seen: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- rows

    def _file_rows(self, path: Path, lo: int, hi: int) -> Iterator[tuple[int, dict]]:
        """(row in file, row dict) for rows lo..hi-1 of one file, reading only the row groups that hold them."""
        pq = _pyarrow_parquet()
        groups, first, start = [], None, 0
        for g, n in enumerate(self.row_groups[path]):
            if start < hi and start + n > lo:
                groups.append(g)
                first = start if first is None else first
            start += n
        if not groups:
            return
        pf = pq.ParquetFile(path)
        columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
        row = first
        for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=columns):
            for r in batch.to_pylist():
                if lo <= row < hi:
                    yield row, r
                row += 1

    def _filter_reason(self, r: dict, has_valid_flag: bool) -> str | None:
        o = self.options
        if o.collections is not None and r.get("collection") not in o.collections:
            return "collection"
        if o.min_quality > 0:
            qa = r.get("quality_assessment") or {}
            if any((qa.get(k) or 0) < o.min_quality for k in QUALITY_KEYS):
                return "quality"
        if has_valid_flag and not o.keep_invalid_descriptions and (r.get("description") or {}).get(
                "description_valid") is False:
            return "description_invalid"
        return None

    def _kept_rows(self, counter: BadCounter, rows: tuple[int, int] | None = None) -> Iterator[tuple[Path, int, dict]]:
        """The rows `rows` (global [lo, hi); default this process's share) that pass the filters, file by file;
        each is counted in `counter.total`."""
        lo, hi = rows or self.rows
        offset = 0
        for path in self.files:
            n = sum(self.row_groups[path])
            a, b = max(lo - offset, 0), min(hi - offset, n)
            offset += n
            if a >= b:
                continue
            kept, before = 0, dict(self.filtered)
            for row, r in self._file_rows(path, a, b):
                self.collections_seen[str(r.get("collection"))] = self.collections_seen.get(
                    str(r.get("collection")), 0) + 1
                reason = self._filter_reason(r, self.has_valid_flag[path])
                if reason is not None:
                    self.filtered[reason] = self.filtered.get(reason, 0) + 1
                    continue
                counter.total += 1
                kept += 1
                yield path, row, r
            now = {k: v - before.get(k, 0) for k, v in self.filtered.items() if v - before.get(k, 0)}
            self.log(f"{path.name}: rows {a}-{b - 1}, {kept} kept" + (f", filtered {now}" if now else "")
                     + ("" if self.has_valid_flag[path] else " (no description_valid: descriptions not filtered)"))

    # ------------------------------------------------------------------------------------------- pairs

    def _row_pairs(self, path: Path, row: int, r: dict, size: int,
                   limits: ImageLimits) -> tuple[list, tuple[str, str] | None]:
        """([(Record, reference, target), ...], None), or ([], (reason, message)) for an unusable row."""
        where = f"{path} row {row}"
        d = r.get("description") or {}
        both = self.options.directions == "both"
        texts = [d.get("item"), d.get("description_1")] + ([d.get("description_0")] if both else [])
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            return [], ("fields", f"{where}: description lacks a string item, description_1"
                                  + (" or description_0" if both else ""))
        try:
            data = _image_bytes(r.get("image"), path.parent, limits)
        except (FileNotFoundError, IsADirectoryError) as e:
            return [], ("missing_image", f"{where}: image not found ({e})")
        except Exception as e:  # noqa: BLE001 - a file above the limits, unreadable, not a regular file
            return [], ("bad_image", f"{where}: image cannot be read ({e})")
        try:
            img = decode_image(data, where, limits)  # its message names `where`
        except Exception as e:  # noqa: BLE001 - decode_image speaks ValueError; PIL may still raise others
            return [], ("bad_image", str(e))
        try:
            left, right = split_views(img, self.options.padding)
        except ValueError as e:
            return [], ("bad_image", f"{where}: {e}")
        lv, rv = center_crop_resize(left, size), center_crop_resize(right, size)
        name = f"{path}#{row}"
        out = [(Record(f"{name}:left", f"{name}:right", d["description_1"], d["item"], row, str(path)), lv, rv)]
        if both:
            out.append((Record(f"{name}:right", f"{name}:left", d["description_0"], d["item"], row, str(path)),
                        rv, lv))
        return out, None

    def pairs(self, size: int, counter: BadCounter, *, threads: int = 4, limits: ImageLimits = DEFAULT_LIMITS,
              rows: tuple[int, int] | None = None) -> Iterator[tuple[Record, np.ndarray, np.ndarray]]:
        """Yield (Record, reference (3, size, size), target) in file and row order for the global rows `rows`
        (default: this process's share), images (within `limits`) decoded and split by `threads` worker threads a
        few rows ahead; unusable rows are counted and skipped."""
        window: collections.deque[Future] = collections.deque()
        with ThreadPoolExecutor(max(threads, 1)) as pool:
            for item in self._kept_rows(counter, rows):
                window.append(pool.submit(self._row_pairs, *item, size, limits))
                while len(window) > 2 * threads or (window and window[0].done()):
                    yield from self._emit(window.popleft().result(), counter)
            while window:
                yield from self._emit(window.popleft().result(), counter)

    @staticmethod
    def _emit(result: tuple[list, tuple[str, str] | None], counter: BadCounter) -> list:
        pairs, bad = result
        if bad is not None:
            counter.add(*bad)
        return pairs

    def meta(self) -> dict:
        """What the index records of the source: format, filters, this process's rows, filtered counts."""
        o = self.options
        return {"format": "subjects200k", "source_rows": self.rows[1] - self.rows[0], "total_rows": self.total_rows,
                "filtered": dict(self.filtered), "collections_seen": dict(self.collections_seen),
                "filters": {"min_quality": o.min_quality, "collections": list(o.collections) if o.collections else None,
                            "keep_invalid_descriptions": o.keep_invalid_descriptions, "directions": o.directions,
                            "padding": o.padding}}
