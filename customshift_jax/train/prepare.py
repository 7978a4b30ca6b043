"""Encode a manifest once: images through the Flax VAE (posterior mean, scaled), captions and subject names
through the text encoders; write the shards `train.data.ShardDataset` reads. No frozen encoder runs in training.

Streamed: pairs are read, encoded and written a batch at a time, so memory holds a batch whatever the data's size.
Each block of `shard_size` records (Subjects200K rows) becomes one shard, recorded when finished: a rerun of an
interrupted prepare with the same settings encodes only the blocks not finished.
In a job of several processes (`jax.distributed`), process p of P encodes its contiguous share of the records
(of the JSONL manifest's, or of the Subjects200K rows) on its own devices (`mesh`: this process's devices, the
text encoders sharded by `rules`, the VAE batch split), writes its own shards, and process 0 writes one index
whose record order is the manifest's (`train.prepare_out`)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from customshift_jax.io.folder_lock import exclusive_folder
from customshift_jax.io.images import ImageLimits
from customshift_jax.io.loading import load_vae
from customshift_jax.models.vae import scale_latents, vae_encode
from customshift_jax.parallel.distributed import barrier
from customshift_jax.text import load_text_encoders
from customshift_jax.text.backends import resolve_text_backend
from customshift_jax.train.data import (
    BadCounter,
    Record,
    ShardWriter,
    TooMuchBadData,
    read_manifest,
    read_pairs,
    records_from_folders,
    too_much_bad_data,
)
from customshift_jax.train.made_by import text_encoders_identity, vae_identity
from customshift_jax.train.prepare_out import MARKER, PrepareDestination, check_destination  # noqa: F401 - re-exported
from customshift_jax.train.subjects200k import Subjects200KOptions, Subjects200KSource

FORMATS = ("jsonl", "subjects200k", "folders")


def prepare(manifest: str | Path, out: str | Path, *, checkpoint: str | Path, text_encoders: str | Path,
            size: int = 512, batch_size: int = 8, shard_size: int = 1024, flip: bool = True,
            max_sequence_length: int = 256, max_bad_fraction: float = 0.05, read_threads: int = 4,
            limits: ImageLimits = ImageLimits(), format: str = "jsonl", subjects200k: Subjects200KOptions | None = None,
            text_backend: str = "auto", mesh: Any = None, rules: Any = "fsdp", progress: bool | None = None,
            log: Any = print) -> dict:
    """Prepare `manifest` into shards at `out` (process 0 holding its lock: one prepare per OUT); returns the
    index. See `_prepare`."""
    import jax

    kw = dict(checkpoint=checkpoint, text_encoders=text_encoders, size=size, batch_size=batch_size,
              shard_size=shard_size, flip=flip, max_sequence_length=max_sequence_length,
              max_bad_fraction=max_bad_fraction, read_threads=read_threads, limits=limits, format=format,
              subjects200k=subjects200k, text_backend=text_backend, mesh=mesh, rules=rules, progress=progress, log=log)
    if jax.process_index() != 0:
        return _prepare(manifest, out, **kw)
    with exclusive_folder(out, "OUT", log=log):
        return _prepare(manifest, out, **kw)


def _prepare(manifest: str | Path, out: str | Path, *, checkpoint: str | Path, text_encoders: str | Path,
             size: int, batch_size: int, shard_size: int, flip: bool, max_sequence_length: int,
             max_bad_fraction: float, read_threads: int, limits: ImageLimits, format: str,
             subjects200k: Subjects200KOptions | None, text_backend: str, mesh: Any, rules: Any,
             progress: bool | None, log: Any) -> dict:
    """Prepare `manifest` into shards at `out`; returns the index. Bad lines/images are skipped with a counted
    warning; above `max_bad_fraction` it stops, keeping no shard: a JSONL manifest's bad lines are counted before
    any model loads, its bad images at the one that makes the fraction certain; a Subjects200K folder's (a stream
    of unknown length) at the end. `format="subjects200k"`: `manifest` is a folder of Subjects200K parquet shards
    (`train.subjects200k`, filtered by `subjects200k`). `mesh`: this process's devices for the JAX text encoders
    (sharded by `rules`) and the VAE (batch split). `progress`: a bar (default: process 0's, when stderr is a
    terminal), else a line every half minute."""
    import jax

    if format not in FORMATS:
        raise ValueError(f"--format {format}: expected one of {', '.join(FORMATS)}.")
    pid, count = jax.process_index(), jax.process_count()
    say = log if count == 1 else (lambda m: log(f"[process {pid} of {count}] {m}"))
    dest = PrepareDestination(out, manifest, index=pid, count=count, log=say)
    backend = resolve_text_backend(text_encoders, "jax" if mesh is not None and text_backend == "auto"
                                   else text_backend)
    if mesh is not None and backend != "jax":
        raise ValueError("--mesh shards the text encoders in JAX; use --text-backend jax (or auto), or drop --mesh.")
    # A Subjects200K folder and its files' columns are checked here, before any model loads.
    source = (Subjects200KSource(manifest, subjects200k, process_index=pid, process_count=count, log=say)
              if format == "subjects200k" else None)
    lines = BadCounter()  # the JSONL manifest's lines: every process reads all of them, so the same counts
    records = (records_from_folders(manifest, lines) if format == "folders" else
               read_manifest(manifest, lines) if source is None else [])
    lines.check(max_bad_fraction, f"manifest {manifest}")  # stop early when the manifest alone is too bad
    share = records[pid * len(records) // count:(pid + 1) * len(records) // count]
    vae_config, vae_params = load_vae(checkpoint)  # our checkpoint or a diffusers folder
    if size % (2 ** (len(vae_config.block_out_channels) - 1)):
        raise ValueError(f"--size {size} is not a multiple of the VAE's downsampling factor.")
    encoders = load_text_encoders(text_encoders, backend=backend, mesh=mesh, rules=rules)
    encode_images = image_encoder(vae_config, vae_params, (4 if flip else 2) * batch_size, mesh)
    counter = _share_counter(lines, source, manifest, max_bad_fraction)
    # One shard per block of `shard_size` records (Subjects200K rows) of this process's share: a rerun resumes at
    # the first block not finished.
    lo, hi = (0, len(share)) if source is None else source.rows
    blocks = [(b, min(b + shard_size, hi)) for b in range(lo, hi, shard_size)]
    made_by = {"vae": vae_identity(vae_config, vae_params), "text_encoders": text_encoders_identity(text_encoders,
                                                                                                   encoders)}
    dest.begin(_fingerprint(manifest, format, checkpoint, encoders, source, size=size, flip=flip,
                            max_sequence_length=max_sequence_length, shard_size=shard_size, made_by=made_by))
    done = _resumed(dest, counter, len(blocks), say)
    bar = progress if progress is not None else pid == 0 and sys.stderr.isatty()
    todo = sum(b - a for k, (a, b) in enumerate(blocks) if k not in done) if source is None else None
    meter = Progress(todo, bar, say)
    capacity = shard_size * (2 if source is not None and source.options.directions == "both" else 1)
    try:
        for k, (a, b) in enumerate(blocks):
            if k in done:
                continue
            pairs = (lambda c: read_pairs(share[a:b], size, c, threads=read_threads, limits=limits)) if source is None \
                else (lambda c: source.pairs(size, c, threads=read_threads, limits=limits, rows=(a, b)))
            writer = ShardWriter(out, capacity, name=f"{dest.shard_prefix}{k:05d}")
            done[k] = encode_block(pairs, writer, counter, source, encode_images, encoders, meter,
                                   batch_size=batch_size, flip=flip, max_sequence_length=max_sequence_length)
            dest.record_blocks(done)
        meter.close()
    except TooMuchBadData:
        dest.discard(done)
        if count == 1:
            dest.abandon()
            raise
        done = {}  # the others learn it when the counts meet below: all stop alike
    settings = {"size": size, "flip": flip, "max_sequence_length": max_sequence_length, "manifest": str(manifest),
                "made_by": made_by}
    return _conclude(dest, done, lines, counter, source, share, settings, max_bad_fraction, say)


def _share_counter(lines: BadCounter, source: Subjects200KSource | None, manifest: str | Path,
                   max_bad_fraction: float) -> BadCounter:
    """The counter of this process's bad images (JSONL) or rows (Subjects200K). A JSONL manifest's length is known,
    so its counter stops the run at the bad image that makes the fraction certain; a stream's is judged at the end."""
    counter = BadCounter()
    if source is None:
        def stop_early() -> None:
            bad = lines.bad + counter.bad
            if bad > max_bad_fraction * lines.total:
                raise too_much_bad_data(f"manifest {manifest}", bad, lines.total, max_bad_fraction,
                                        {**lines.reasons, **counter.reasons}, lines.examples + counter.examples,
                                        so_far=True)
        counter.after_add = stop_early
    return counter


def _resumed(dest: PrepareDestination, counter: BadCounter, n_blocks: int, say: Callable[[str], Any]) -> dict:
    """{block: its record} of the blocks an earlier run finished, their counts added to `counter`."""
    done = dest.done_blocks()
    for record in done.values():
        counter.total += record["total"]
        counter.examples += record["examples"]
    counter.reasons = _summed([counter.reasons] + [r["reasons"] for r in done.values()])
    if done:
        say(f"resuming: {len(done)} of {n_blocks} shard(s) already encoded "
            f"({sum(r['pairs'] for r in done.values())} pairs)")
    return done


def _conclude(dest: PrepareDestination, done: dict, lines: BadCounter, counter: BadCounter,
              source: Subjects200KSource | None, share: list, settings: dict, max_bad_fraction: float,
              say: Callable[[str], Any]) -> dict:
    """Meet every process's counts: stop (keeping no shard) when too much was bad or nothing was written, else
    process 0 writes the index; every process returns the index once it is there."""
    import jax

    pid, count = jax.process_index(), jax.process_count()
    blocks_done = [done[k] for k in sorted(done)]
    written = sum(r["pairs"] for r in blocks_done)
    meta = {"records": len(share)}
    if source is not None:
        meta = {**source.meta(), "filtered": _summed(r["filtered"] for r in blocks_done),
                "collections_seen": _summed(r["collections_seen"] for r in blocks_done)}
    part = {"process": pid, "shards": [r["shard"] for r in blocks_done if r["shard"]], "pairs": written,
            "bad": counter.bad, "total": counter.total, "reasons": counter.reasons, "examples": counter.examples[:5],
            "latent_shape": next((r["latent_shape"] for r in blocks_done if r["latent_shape"]), None), "source": meta}
    bad, total, n = (int(x) for x in dest.gather(part, (counter.bad, counter.total, written)).sum(0))
    bad, total = bad + lines.bad, total + lines.total
    manifest = settings["manifest"]
    if total and bad / total > max_bad_fraction or not n:
        dest.discard(done)
        dest.abandon()
        reasons = {**lines.reasons, **counter.reasons}
        if not n:
            raise ValueError(f"{manifest}: no usable records ({bad} of {total} skipped: {reasons}).")
        raise too_much_bad_data(f"manifest {manifest}", bad, total, max_bad_fraction, reasons,
                                lines.examples + counter.examples, seen_by="" if count == 1 else
                                f"process {pid} of {count}")
    if pid == 0:
        parts = dest.parts(part)
        dest.write_index(parts, {**settings, **_merged(parts, lines, source)})
    barrier("customshift-prepare-indexed")  # every process returns once the index is there
    out = dest.out
    index = json.loads((Path(out) / "index.json").read_text())
    filtered = f"; filtered {index['filtered']}" if source is not None else ""
    say(f"wrote {out} ({index['count']} pairs; {bad} of {total} skipped{_named(lines.examples + counter.examples, bad)}"
        f"{filtered})" + (f"; this process {written} pairs" if count > 1 else ""))
    return index


def _named(examples: list[str], bad: int, shown: int = 5) -> str:
    """': <the first skipped records, by file and line>; and N more' for the summary line ('' when none)."""
    if not bad or not examples:
        return ""
    first = examples[:shown]
    return ": " + "; ".join(first) + (f"; and {bad - len(first)} more" if bad > len(first) else "")


def _merged(parts: list[dict], lines: BadCounter, source: Subjects200KSource | None) -> dict:
    """The index's counts over every process's part: skipped records by reason, records seen, the latent shape,
    Subjects200K's filter counts, and (several processes) what each process wrote."""
    reasons = _summed([lines.reasons] + [p["reasons"] for p in parts])
    meta = {"latent_shape": next(p["latent_shape"] for p in parts if p["latent_shape"]),
            "skipped": sum(reasons.values()), "skipped_reasons": reasons,
            "skipped_examples": (lines.examples + [e for p in parts for e in p["examples"]])[:20],
            "manifest_records": lines.total + sum(p["total"] for p in parts)}
    if source is not None:
        merged = dict(parts[0]["source"])
        merged["source_rows"] = sum(p["source"]["source_rows"] for p in parts)
        for key in ("filtered", "collections_seen"):
            merged[key] = _summed(p["source"][key] for p in parts)
        meta.update(merged)
    if len(parts) > 1:
        meta["processes"] = [{"process": p["process"], "pairs": p["pairs"], "skipped": p["bad"],
                              "shards": len(p["shards"])} for p in parts]
    return meta


def encode_block(pairs: Callable[[BadCounter], Iterator], writer: ShardWriter, counter: BadCounter,
                 source: Subjects200KSource | None, encode_images: Callable, encoders: Any, meter: "Progress", *,
                 batch_size: int, flip: bool, max_sequence_length: int) -> dict:
    """Encode one block's pairs into its shard: its record for the progress file (the shard, its pairs, and the
    block's own counts: skipped by reason, records seen, first examples, Subjects200K's filtered and
    collections)."""
    reasons, total, examples = dict(counter.reasons), counter.total, len(counter.examples)
    filtered, seen = (dict(source.filtered), dict(source.collections_seen)) if source is not None else ({}, {})
    try:
        n, shape = encode_pairs(pairs(counter), writer, encode_images, encoders, meter, batch_size=batch_size,
                                flip=flip, max_sequence_length=max_sequence_length)
        writer.flush()
    except BaseException:
        writer.abort()  # the shard in progress leaves no temp file; finished blocks stay for a resume
        raise
    delta = lambda now, before: {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}  # noqa: E731
    return {"shard": writer.shards[0] if writer.shards else None, "pairs": n, "latent_shape": shape,
            "reasons": delta(counter.reasons, reasons), "total": counter.total - total,
            "examples": counter.examples[examples:examples + 5],
            "filtered": delta(source.filtered, filtered) if source is not None else {},
            "collections_seen": delta(source.collections_seen, seen) if source is not None else {}}


def _summed(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts by key, added over `dicts`."""
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _fingerprint(manifest: str | Path, format: str, checkpoint: str | Path, encoders: Any,
                 source: Subjects200KSource | None, **settings: Any) -> dict:
    """What shapes the shards: the data (the manifest file's size and time, or each parquet file's size), the
    VAE's checkpoint, the text encoders' identity, the filters and the settings (with `made_by`: the VAE's and
    the encoders' content hashes). A resume needs it unchanged."""
    if source is not None:
        data = [[str(f), f.stat().st_size] for f in source.files]
        settings["filters"] = dataclasses.asdict(source.options)
    elif "://" in str(manifest):
        data = None
    elif format == "folders":  # every image's name, size and time
        data = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(manifest).rglob("*"))
                if f.is_file()]
    else:
        st = Path(manifest).stat()
        data = [st.st_size, st.st_mtime_ns]
    return {"format": format, "data": data, "checkpoint": str(Path(checkpoint).absolute()),
            "text_encoders": getattr(encoders, "identity", None), **settings}


def image_encoder(vae_config: Any, vae_params: Any, rows: int, mesh: Any = None) -> Callable[[np.ndarray], np.ndarray]:
    """Pixels (n <= rows, 3, H, W) -> scaled VAE latents (n, C, h, w), one compiled shape (padded to `rows`, a
    multiple of the mesh's size); on `mesh` the batch is split over its devices and the VAE replicated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    fn = lambda p, x: scale_latents(vae_config, vae_encode(vae_config, p, x))  # noqa: E731
    if mesh is None:
        jitted, params, split = jax.jit(fn), vae_params, None
    else:
        rows = -(-rows // mesh.size) * mesh.size
        replicated = NamedSharding(mesh, PartitionSpec())
        split = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        params = jax.device_put(vae_params, replicated)
        jitted = jax.jit(fn, in_shardings=(replicated, split), out_shardings=split)

    def run(images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.pad(images, ((0, rows - n),) + ((0, 0),) * (images.ndim - 1))
        x = jnp.asarray(padded) if split is None else jax.device_put(padded, split)  # no numpy for a sharded input
        return np.asarray(jitted(params, x))[:n]

    return run


def encode_pairs(pairs: Iterator[tuple[Record, np.ndarray, np.ndarray]], writer: ShardWriter,
                 encode_images: Callable[[np.ndarray], np.ndarray], encoders: Any, progress: "Progress", *,
                 batch_size: int, flip: bool, max_sequence_length: int) -> tuple[int, list[int] | None]:
    """Encode and write `pairs` a batch at a time: (pairs written, latent shape)."""
    stream, written, shape = iter(pairs), 0, None
    while True:
        chunk = list(itertools.islice(stream, batch_size))
        if not chunk:
            return written, shape
        n = len(chunk)
        refs, tgts = np.stack([p[1] for p in chunk]), np.stack([p[2] for p in chunk])
        lat = encode_images(np.concatenate([tgts, refs] + ([tgts[..., ::-1], refs[..., ::-1]] if flip else [])))
        arrays = {"latents": lat[:n], "ref_latents": lat[n:2 * n]}
        if flip:
            arrays.update(latents_flip=lat[2 * n:3 * n], ref_latents_flip=lat[3 * n:4 * n])
        emb, pooled = encoders.encode_batch([p[0].caption for p in chunk], max_sequence_length=max_sequence_length)
        s_emb, s_pooled = encoders.encode_batch([p[0].subject for p in chunk],
                                                max_sequence_length=max_sequence_length)
        arrays.update(prompt_embeds=emb, pooled=pooled, subject_embeds=s_emb, subject_pooled=s_pooled)
        writer.add(arrays)
        written, shape = written + n, list(lat.shape[1:])
        progress.update(n)


class Progress:
    """Pairs encoded so far: a tqdm bar (pairs/s, and the share's size when known), or without one a log line at
    the first batch and then every `every_s` seconds, so a long run says where it is without flooding a log."""

    def __init__(self, total: int | None, bar: bool, log: Callable[[str], Any], every_s: float = 30.0):
        self.total, self.log, self.every_s, self.done = total, log, every_s, 0
        self.t0 = self.last = time.time()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="prepare", unit="pair", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done == n or time.time() - self.last >= self.every_s:
            self.last = time.time()
            self.log(self.line())

    def line(self) -> str:
        seconds = time.time() - self.t0
        of = f"/{self.total}" if self.total is not None else ""
        return f"encoded {self.done}{of} pairs ({seconds:.0f}s, {self.done / max(seconds, 1e-9):.2f} pairs/s)"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            self.log(self.line())
