"""What made a prepared dataset, by content: the VAE (its config and every param) and the text encoders (the
hashes our checkpoint records for them, or every file of a diffusers folder's text components). Recorded in the
index and in the marker's fingerprint, so a resume after the weights changed at the same path redoes the work."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from customshift_jax.io.integrity import file_hash, leaves_hash


def _leaves(tree: Any, prefix: tuple[str, ...] = ()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def vae_identity(config: Any, params: Any) -> str:
    """"sha256:<hex>" of the VAE's config and params (whatever format they were read from)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    h.update(leaves_hash(_leaves(params)).encode())
    return f"sha256:{h.hexdigest()}"


def text_encoders_identity(source: str | Path, encoders: Any) -> str:
    """"sha256:<hex>" naming the text encoders by content: our checkpoint's encoders are named by its recorded
    hashes already (their `identity`); a diffusers folder's text components are hashed file by file."""
    from customshift_jax.text.backends import holds_converted_encoders
    from customshift_jax.text.encode import resolve_text_folder

    h = hashlib.sha256(str(getattr(encoders, "identity", None)).encode())
    if not holds_converted_encoders(source):
        folder, have, _ = resolve_text_folder(source)
        files = sorted(f for name, used in have.items() if used for f in (folder / name).rglob("*") if f.is_file())
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL: files in parallel
            hashes = list(pool.map(file_hash, files))
        h.update(json.dumps([[str(f.relative_to(folder)), d] for f, d in zip(files, hashes)]).encode())
    return f"sha256:{h.hexdigest()}"
