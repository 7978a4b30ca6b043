"""Training data: the JSONL manifest, paired image reading and augmentation, prepared latent shards, and a
deterministic, per-process, checkpointable batch iterator over them (grain).

Manifest: one JSON object a line, {"reference": path, "target": path, "caption": str, "subject": str}; paths
are local or any fsspec URL, relative ones relative to the manifest. Prepared data (`customshift prepare`):

    OUT/index.json                  {"version", "count", "size", "latent_shape", "flip", "made_by", "shards":
                                     [{"dir", "count", "arrays", "digests"}, ...], ...}
    OUT/shard-00000/<array>.npy     latents, ref_latents (+ latents_flip, ref_latents_flip), prompt_embeds,
                                    pooled, subject_embeds, subject_pooled; row i of each is one record
    OUT/shard-00000/row-digests.bin every row's digest, per array (`train.shard_digests`): each record read is
                                    checked against them; the index holds the file's own hash ("digests")
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from customshift_jax.io.images import ImageLimits, read_image
from customshift_jax.io.safe_files import read_regular_file, refuse_link
from customshift_jax.train.shard_digests import DamagedShard, check_row, read_digests
from customshift_jax.train.shard_writer import FORMAT_VERSION, INDEX_NAME, ShardWriter  # noqa: F401 - re-exported

REQUIRED_FIELDS = ("reference", "target", "caption", "subject")
TEXT_ARRAYS = ("prompt_embeds", "pooled", "subject_embeds", "subject_pooled")
MANIFEST_MAX_BYTES = 2**30  # a 1 GiB manifest is millions of lines; /dev/zero named as one stops here


class BadDataWarning(UserWarning):
    """A manifest line or image was skipped."""


class TooMuchBadData(ValueError):
    """More than `max_bad_fraction` of the manifest is unusable."""


@dataclasses.dataclass
class Record:
    """One training pair as the manifest names it (paths resolved)."""

    reference: str
    target: str
    caption: str
    subject: str
    line: int
    source: str = ""  # the manifest (or dataset file) the record came from, for messages


@dataclasses.dataclass
class BadCounter:
    """Counts of skipped lines by reason, and the first few messages."""

    total: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    warned: dict[str, int] = dataclasses.field(default_factory=dict)  # counted warnings: kept, or dropped repeats
    after_add: Callable[[], None] | None = None  # called after each bad record: may raise to stop a stream there

    def warn(self, reason: str, message: str) -> None:
        """A counted warning that does not count as bad data (a repeated line, text that is not UTF-8)."""
        self.warned[reason] = self.warned.get(reason, 0) + 1
        if self.warned[reason] <= 5:
            warnings.warn(message, BadDataWarning, stacklevel=3)

    def add(self, reason: str, message: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(message)
        warnings.warn(f"skipped: {message}", BadDataWarning, stacklevel=3)
        if self.after_add is not None:
            self.after_add()

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    def check(self, max_bad_fraction: float, what: str) -> None:
        """Stop with a clear message when the bad fraction exceeds `max_bad_fraction`."""
        if self.total and self.bad / self.total > max_bad_fraction:
            raise too_much_bad_data(what, self.bad, self.total, max_bad_fraction, self.reasons, self.examples)

    def summary(self) -> str:
        text = f"{self.bad} of {self.total} skipped" + (f" ({self.reasons})" if self.bad else "")
        return text + (f"; warnings {self.warned}" if self.warned else "")


def too_much_bad_data(what: str, bad: int, total: int, max_bad_fraction: float, reasons: dict[str, int],
                      examples: list[str], *, so_far: bool = False, seen_by: str = "") -> TooMuchBadData:
    """The stop for too much bad data, in the flags the user typed; `so_far`: counted before reading the rest;
    `seen_by`: whose reasons and examples these are, when only part of the records' ("process 1 of 4")."""
    when = " already, before the rest was read" if so_far else ""
    by = f" seen by {seen_by}" if seen_by else ""
    return TooMuchBadData(
        f"{what}: {bad} of {total} records are unusable{when} ({bad / total:.1%} > --max-bad-fraction "
        f"{max_bad_fraction:.1%}); reasons{by} {reasons}; first: {examples[:3]}. Fix the data or raise "
        "--max-bad-fraction.")


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _exists(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _resolve(path: str, base: str) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return base.rstrip("/") + "/" + path if "://" in base else str(Path(base) / path)


def read_manifest(path: str | Path, counter: BadCounter | None = None) -> list[Record]:
    """Parse the manifest; a non-JSON line or one without the four fields is counted as bad and skipped."""
    path = str(path)
    if not _exists(path):
        raise FileNotFoundError(f"manifest {path} does not exist (expected a JSONL file of "
                                f"{{\"reference\", \"target\", \"caption\", \"subject\"}} records).")
    counter = counter if counter is not None else BadCounter()
    base = path.rsplit("/", 1)[0] if "://" in path else str(Path(path).parent)
    data = read_regular_file(path, MANIFEST_MAX_BYTES, "manifest", "1 GiB", _open if "://" in path else None)
    records, seen = [], {}
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        counter.total += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # paths keep their bytes (they name real files); text gets U+FFFD
            line = raw.decode("utf-8", errors="surrogateescape")
            counter.warn("not_utf8", f"{path}:{n} is not UTF-8; its paths are kept byte for byte, its text has "
                                     "the undecodable bytes replaced")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            counter.add("not_json", f"{path}:{n} is not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in REQUIRED_FIELDS):
            counter.add("fields", f"{path}:{n} lacks one of the string fields {REQUIRED_FIELDS}")
            continue
        key = tuple(obj[k] for k in REQUIRED_FIELDS)
        if key in seen:
            counter.warn("duplicate", f"{path}:{n} repeats line {seen[key]}; dropped")
            continue
        seen[key] = n
        records.append(Record(_resolve(obj["reference"], base), _resolve(obj["target"], base),
                              _text(obj["caption"]), _text(obj["subject"]), n, path))
    return records


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def records_from_folders(root: str | Path, counter: BadCounter | None = None) -> list[Record]:
    """Pairs from a folder of subject folders (DreamBench's layout: root/dog/00.jpg, ...), or from one subject
    folder of images: each image is the reference of the next image of its subject (the last of the first), with
    the caption "a photo of a <subject>" and the folder's name as the subject ("_" read as a space). A subject
    with fewer than two images makes no pair: counted as a warning."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--format folders: {root} is not a folder (expected subject folders of images, "
                                "e.g. dreambench/dog/00.jpg).")
    counter = counter if counter is not None else BadCounter()
    subjects = [d for d in sorted(root.iterdir()) if d.is_dir() and _images(d)] or [root]
    records = []
    for folder in subjects:
        images, subject = _images(folder), folder.name.replace("_", " ")
        if len(images) < 2:
            counter.warn("single_image", f"{folder} holds {len(images)} image(s): no pair to make; skipped")
            continue
        for i, target in enumerate(images):
            counter.total += 1
            records.append(Record(str(images[i - 1]), str(target), f"a photo of a {subject}", subject,
                                  len(records) + 1, str(root)))
    if not records:
        raise ValueError(f"--format folders: {root} holds no subject folder of two or more images "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
    return records


def _text(s: str) -> str:
    """Text as valid Unicode: bytes that were not UTF-8 (kept as surrogates) become U+FFFD."""
    return s.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def load_image(path: str, limits: ImageLimits = ImageLimits()) -> Any:
    """A PIL RGB image, fully decoded (a truncated file fails here, not later), read only from a regular file
    within `limits` (remote paths through fsspec, still bounded)."""
    return read_image(path, limits, _open if "://" in path else None)


def center_crop_resize(img: Any, size: int) -> np.ndarray:
    """Centre square crop, bicubic resize to `size`; (3, size, size) float32 in [-1, 1]."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    img = img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    return (np.asarray(img, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def load_pair(record: Record, size: int, limits: ImageLimits = ImageLimits()) -> tuple[np.ndarray, np.ndarray]:
    """(reference, target) pixels, each (3, size, size); raises OSError/ValueError for a missing or bad file."""
    return (center_crop_resize(load_image(record.reference, limits), size),
            center_crop_resize(load_image(record.target, limits), size))


def try_read_pair(record: Record, size: int, limits: ImageLimits) -> tuple[Record, Any, Any, tuple[str, str] | None]:
    """(record, reference, target, None), or (record, None, None, (reason, message)) for an unreadable image."""
    where = f"{record.source}:{record.line}" if record.source else f"line {record.line}"
    try:
        return (record, *load_pair(record, size, limits), None)
    except FileNotFoundError as e:
        return record, None, None, ("missing_image", f"{where}: image not found ({e})")
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        return record, None, None, ("bad_image", f"{where}: image cannot be used ({type(e).__name__}: {e})")


def read_pairs(records: list[Record], size: int, counter: BadCounter, *, threads: int = 4,
               limits: ImageLimits = ImageLimits()) -> Iterator[tuple[Record, np.ndarray, np.ndarray]]:
    """Yield readable pairs in manifest order, read and decoded by grain's worker threads; an unreadable image
    (missing, truncated, not an image) is counted and skipped."""
    import grain

    if not records:
        return
    pairs = grain.MapDataset.source(records).map(lambda r: try_read_pair(r, size, limits))
    for record, ref, tgt, bad in pairs.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                         prefetch_buffer_size=2 * threads)):
        if bad is not None:
            counter.add(*bad)
            continue
        yield record, ref, tgt


# ------------------------------------------------------------------------------------------- shards

class ShardDataset:
    """Prepared shards as one indexable set of records (arrays memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path} has no {INDEX_NAME}: not a prepared dataset (run "
                                    "`customshift prepare MANIFEST OUT ...` first).")
        self.index = json.loads(index_path.read_text())
        if self.index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: format version {self.index.get('version')}, expected {FORMAT_VERSION}.")
        shards = self.index["shards"]
        names = _array_names(self.path, shards)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self.digests: list[np.ndarray | None] = []
        for shard in shards:
            folder = self.path / shard["dir"]
            for name in names:
                parts[name].append(_open_array(folder / f"{name}.npy", shard["count"]))
            self.digests.append(read_digests(folder, shard))
        if not parts:
            raise ValueError(f"{self.path}: the index lists no data.")
        missing = [k for k in ("latents", "ref_latents", *TEXT_ARRAYS) if k not in parts]
        if missing:
            raise ValueError(f"{self.path}: the shards lack {missing}.")
        if any(d is None for d in self.digests):
            print(f"warning: {self.path} records no checksums of its shards (prepared by an older customshift-jax); "
                  "read unverified. Run `customshift prepare` again to add them.", file=sys.stderr)
        self.parts = parts
        self.offsets = np.cumsum([0] + [s["count"] for s in shards])
        self.flip = "latents_flip" in parts and "ref_latents_flip" in parts

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, i: int, flip: bool = False) -> dict[str, np.ndarray]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        suffix = "_flip" if flip and self.flip else ""
        read = {**{k: k for k in TEXT_ARRAYS}, "latents": "latents" + suffix, "ref_latents": "ref_latents" + suffix}
        entry = self.index["shards"][s]
        out = {}
        for key, name in read.items():
            out[key] = np.asarray(self.parts[name][s][j])
            check_row(self.digests[s], entry.get("arrays", []), name, out[key], j, self.path / entry["dir"])
        return out


def _array_names(path: Path, shards: list[dict]) -> list[str]:
    """The arrays every shard must hold: those its index entry lists, else those of any shard (older indexes)."""
    names: set[str] = set()
    for shard in shards:
        listed = shard.get("arrays")
        names |= set(listed) if listed else {f.stem for f in (path / shard["dir"]).glob("*.npy")}
    return sorted(names)


def _open_array(path: Path, count: int) -> np.ndarray:
    """A shard's array, memory-mapped: one line naming the shard and the file when it is missing or damaged."""
    try:
        a = np.load(refuse_link(path, "shard"), mmap_mode="r")
    except FileNotFoundError:
        raise DamagedShard(f"{path.parent}: {path.name} is missing (the other shards have it): the prepared data is "
                           "incomplete; run `customshift prepare` again.") from None
    except (ValueError, OSError) as e:
        raise DamagedShard(f"{path} cannot be read as an array ({' '.join(str(e).split())}): damaged shard; run "
                           "`customshift prepare` again.") from None
    if a.dtype != np.float32 or a.ndim < 1:
        raise DamagedShard(f"{path} holds {a.dtype} of shape {a.shape}, not float32 rows: damaged shard.")
    if a.shape[0] != count:
        raise DamagedShard(f"{path} has {a.shape[0]} rows, the index says {count}: damaged shard.")
    return a


def index_batches(count: int, global_batch: int, *, seed: int, shuffle: bool = True, flip_prob: float = 0.5):
    """A grain MapDataset of global batches of record choices: item k is (indices (G,), flips (G,)).

    Epoch after epoch without end, each a new permutation (grain's index shuffle seeded from `seed` and the
    epoch); the flip of each record is drawn from its own seeded generator. Batches run across epoch ends.
    """
    import grain

    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"the data seed must be in 0..2**32-1 for grain, got {seed}.")
    ds = grain.MapDataset.range(count).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.random_map(lambda i, rng: (i, rng.random() < flip_prob))
    return ds.repeat().batch(global_batch, drop_remainder=True)


class BatchIterator:
    """Deterministic batches read with grain (see `index_batches`): process p of P takes rows [p*G/P, (p+1)*G/P)
    of each global batch of G and reads only those; the same horizontal flip (of the prepared flipped latents)
    applies to target and reference. `state()` / `restore()` give and take the exact position (JSON: grain's
    iterator state plus what must match on resume)."""

    def __init__(self, dataset: ShardDataset, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 flip_prob: float = 0.5, process_index: int | None = None, process_count: int | None = None,
                 read_threads: int = 2, prefetch: int = 2):
        import grain
        import jax

        self.ds, self.global_batch, self.seed, self.shuffle = dataset, global_batch, seed, shuffle
        self.flip_prob = flip_prob if dataset.flip else 0.0
        self.pi = jax.process_index() if process_index is None else process_index
        self.pc = jax.process_count() if process_count is None else process_count
        if global_batch % self.pc:
            raise ValueError(f"the global batch {global_batch} does not split over {self.pc} processes.")
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} records, fewer than one batch of {global_batch}.")
        local = global_batch // self.pc
        rows = slice(self.pi * local, (self.pi + 1) * local)
        batches = index_batches(len(dataset), global_batch, seed=seed, shuffle=shuffle, flip_prob=self.flip_prob)
        local_batches = batches.map(lambda b: self._read(b[0][rows], b[1][rows]))
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._it = iter(local_batches.to_iter_dataset(options))

    def _read(self, indices: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.ds.get(int(i), bool(f)) for i, f in zip(indices, flips)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _identity(self) -> dict:
        return {"seed": self.seed, "global_batch": self.global_batch, "count": len(self.ds),
                "shuffle": self.shuffle, "flip_prob": self.flip_prob}

    def state(self) -> dict:
        return {"grain": self._it.get_state(), **self._identity()}

    def restore(self, state: dict) -> None:
        if "grain" not in state:
            raise ValueError("cannot resume the data position: the checkpoint was written by an older data "
                             "pipeline (no grain iterator state); start a new run.")
        for k, v in self._identity().items():
            if state.get(k) != v:
                raise ValueError(f"cannot resume the data position: the checkpoint's {k} is {state.get(k)}, "
                                 f"this run's is {v}.")
        self._it.set_state(state["grain"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)


def prepared_text_settings(path: str | Path) -> dict[str, Any] | None:
    """The text settings (`io.text_settings.TextSettings.to_json()`) the prepared data at `path` was encoded with,
    from its index.json, for the model or LoRA trained on it to record; None when the index says none."""
    from customshift_jax.io.text_settings import TextSettings

    index = json.loads((Path(path) / INDEX_NAME).read_text())
    if index.get("max_sequence_length") is None:
        return None
    return TextSettings(int(index["max_sequence_length"]), index.get("clip_skip")).to_json()
