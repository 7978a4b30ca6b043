"""Encode a manifest once: images through the Flax VAE (posterior mean, scaled), captions and subject names
through the text encoders; write the shards `train.data.ShardDataset` reads. No frozen encoder runs in training."""
from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.images import ImageLimits
from customshift_jax.io.loading import load_vae
from customshift_jax.io.safe_files import refuse_link, write_text
from customshift_jax.models.vae import scale_latents, vae_encode
from customshift_jax.text import load_text_encoders
from customshift_jax.train.data import BadCounter, ShardWriter, read_manifest, read_pairs
from customshift_jax.train.subjects200k import Subjects200KOptions, Subjects200KSource

MARKER = ".prepare.json"  # in OUT while (and after) a prepare writes it: which manifest it holds


def prepare(manifest: str | Path, out: str | Path, *, checkpoint: str | Path, text_encoders: str | Path,
            size: int = 512, batch_size: int = 8, shard_size: int = 1024, flip: bool = True,
            max_sequence_length: int = 256, max_bad_fraction: float = 0.05, read_threads: int = 4,
            limits: ImageLimits = ImageLimits(), format: str = "jsonl", subjects200k: Subjects200KOptions | None = None,
            text_backend: str = "auto", log: Any = print) -> dict:
    """Prepare `manifest` into shards at `out`; returns the index. Bad lines/images are skipped with a counted
    warning; above `max_bad_fraction` it stops (TooMuchBadData) before writing anything. Images are read and
    decoded by `read_threads` grain worker threads. `format="subjects200k"`: `manifest` is a folder of Subjects200K
    parquet shards (`train.subjects200k`, filtered by `subjects200k`), streamed: its bad fraction is checked at the
    end, before the index is written."""
    import jax
    import jax.numpy as jnp


    out = Path(out)
    check_destination(out, manifest, log)
    counter = BadCounter()
    if format not in ("jsonl", "subjects200k"):
        raise ValueError(f"--format {format}: expected jsonl or subjects200k.")
    # A Subjects200K folder and its files' columns are checked here, before any model loads.
    source = Subjects200KSource(manifest, subjects200k, log=log) if format == "subjects200k" else None
    records = read_manifest(manifest, counter) if source is None else []
    counter.check(max_bad_fraction, f"manifest {manifest}")  # stop early when the manifest alone is too bad
    vae_config, vae_params = load_vae(checkpoint)  # our checkpoint or a diffusers folder
    if size % (2 ** (len(vae_config.block_out_channels) - 1)):
        raise ValueError(f"--size {size} is not a multiple of the VAE's downsampling factor.")
    encoders = load_text_encoders(text_encoders, backend=text_backend)
    encode = jax.jit(lambda p, x: scale_latents(vae_config, vae_encode(vae_config, p, x)))
    # Read every pair first (cheap next to encoding) so the bad fraction is known before anything is written.
    pairs = list(read_pairs(records, size, counter, threads=read_threads, limits=limits)) if source is None else \
        source.pairs(size, counter, threads=read_threads, limits=limits)  # a stream: never all in memory
    counter.check(max_bad_fraction, f"manifest {manifest}")
    if not pairs:
        raise ValueError(f"manifest {manifest}: no usable records ({counter.summary()}).")
    writer = ShardWriter(out, shard_size)
    write_text(out / MARKER, json.dumps({"manifest": str(Path(manifest).absolute())}) + "\n", what="prepare marker")
    t0 = time.time()
    stream, i, total = iter(pairs), 0, len(pairs) if isinstance(pairs, list) else "?"
    while chunk := list(itertools.islice(stream, batch_size)):
        n = len(chunk)
        refs = np.stack([p[1] for p in chunk])
        tgts = np.stack([p[2] for p in chunk])
        imgs = np.concatenate([tgts, refs] + ([tgts[..., ::-1], refs[..., ::-1]] if flip else []))
        pad = (-len(imgs)) % (4 * batch_size if flip else 2 * batch_size)  # one compiled shape
        lat = np.asarray(encode(vae_params, jnp.asarray(np.pad(imgs, ((0, pad), (0, 0), (0, 0), (0, 0))))))
        arrays = {"latents": lat[:n], "ref_latents": lat[n:2 * n]}
        if flip:
            arrays.update(latents_flip=lat[2 * n:3 * n], ref_latents_flip=lat[3 * n:4 * n])
        emb, pooled = encoders.encode_batch([p[0].caption for p in chunk], max_sequence_length=max_sequence_length)
        s_emb, s_pooled = encoders.encode_batch([p[0].subject for p in chunk],
                                                max_sequence_length=max_sequence_length)
        arrays.update(prompt_embeds=emb, pooled=pooled, subject_embeds=s_emb, subject_pooled=s_pooled)
        writer.add(arrays)
        log(f"encoded {i + n}/{total} pairs ({time.time() - t0:.0f}s)")
        i += n
    counter.check(max_bad_fraction, f"manifest {manifest}")  # a stream's bad fraction is known only now
    if not i:
        raise ValueError(f"{manifest}: no usable records ({counter.summary()}).")
    meta = {"size": size, "latent_shape": list(lat.shape[1:]), "flip": flip,
            "max_sequence_length": max_sequence_length, "manifest": str(manifest),
            "skipped": counter.bad, "skipped_reasons": counter.reasons, "manifest_records": counter.total,
            **(source.meta() if source is not None else {})}
    writer.close(meta)
    log(f"wrote {out} ({i} pairs; {counter.summary()}" + (f"; filtered {source.filtered})" if source else ")"))
    return json.loads((out / "index.json").read_text())


def check_destination(out: Path, manifest: str | Path, log: Any = print) -> None:
    """OUT must be new, empty, or an interrupted `prepare` of this same manifest (whose shards are then redone);
    a finished dataset, a link, or a folder holding anything else is refused, naming what is there."""
    refuse_link(out, "prepare's OUT")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a folder for the shards.")
    if (out / "index.json").exists():
        raise ValueError(f"{out} already holds a prepared dataset; choose another OUT or delete it.")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    try:
        earlier = json.loads((out / MARKER).read_text())["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    ours = all(n == MARKER or (n.startswith("shard-") and (out / n).is_dir() and not (out / n).is_symlink())
               for n in names)
    if earlier != str(Path(manifest).absolute()) or not ours:
        foreign = [n for n in names if n != MARKER and not n.startswith("shard-")] or names
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"OUT {out} is not empty and is not an unfinished prepare of {manifest} (it holds {shown}); "
                         "choose a new or empty folder.")
    for n in names:
        if n.startswith("shard-"):
            shutil.rmtree(out / n)
    log(f"{out}: an unfinished prepare of the same manifest; its {len(names) - 1} shard folder(s) are redone")
