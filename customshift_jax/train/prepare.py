"""Encode a manifest once: images through the Flax VAE (posterior mean, scaled), captions and subject names
through the text encoders; write the shards `train.data.ShardDataset` reads. No frozen encoder runs in training."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.loading import load_vae
from customshift_jax.models.vae import scale_latents, vae_encode
from customshift_jax.text import TextEncoders
from customshift_jax.train.data import BadCounter, ShardWriter, read_manifest, read_pairs


def prepare(manifest: str | Path, out: str | Path, *, checkpoint: str | Path, text_encoders: str | Path,
            size: int = 512, batch_size: int = 8, shard_size: int = 1024, flip: bool = True,
            max_sequence_length: int = 256, max_bad_fraction: float = 0.05, read_threads: int = 4,
            log: Any = print) -> dict:
    """Prepare `manifest` into shards at `out`; returns the index. Bad lines/images are skipped with a counted
    warning; above `max_bad_fraction` it stops (TooMuchBadData) before writing anything. Images are read and
    decoded by `read_threads` grain worker threads."""
    import jax
    import jax.numpy as jnp


    out = Path(out)
    if (out / "index.json").exists():
        raise ValueError(f"{out} already holds a prepared dataset; choose another OUT or delete it.")
    counter = BadCounter()
    records = read_manifest(manifest, counter)
    counter.check(max_bad_fraction, f"manifest {manifest}")  # stop early when the manifest alone is too bad
    vae_config, vae_params = load_vae(checkpoint)  # our checkpoint or a diffusers folder
    if size % (2 ** (len(vae_config.block_out_channels) - 1)):
        raise ValueError(f"--size {size} is not a multiple of the VAE's downsampling factor.")
    encoders = TextEncoders.from_pretrained(text_encoders)
    encode = jax.jit(lambda p, x: scale_latents(vae_config, vae_encode(vae_config, p, x)))
    # Read every pair first (cheap next to encoding) so the bad fraction is known before anything is written.
    pairs = list(read_pairs(records, size, counter, threads=read_threads))
    counter.check(max_bad_fraction, f"manifest {manifest}")
    if not pairs:
        raise ValueError(f"manifest {manifest}: no usable records ({counter.summary()}).")
    writer = ShardWriter(out, shard_size)
    t0 = time.time()
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
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
        log(f"encoded {i + n}/{len(pairs)} pairs ({time.time() - t0:.0f}s)")
    meta = {"size": size, "latent_shape": list(lat.shape[1:]), "flip": flip,
            "max_sequence_length": max_sequence_length, "manifest": str(manifest),
            "skipped": counter.bad, "skipped_reasons": counter.reasons, "manifest_records": counter.total}
    writer.close(meta)
    log(f"wrote {out} ({len(pairs)} pairs; {counter.summary()})")
    import json

    return json.loads((out / "index.json").read_text())
