"""Embeddings cached on disk: one .npy per (model, image content) or (model, text), written atomically.

Key: the encoder's identity (its folder's configs and weights, `encoders.model_identity`) and the SHA-256 of the
image file's bytes or of the text, so a rerun, or a second method's folder, costs only the images not seen yet.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.eval.encoders import read_image
from customshift_jax.eval.plan import atomic_write_bytes


class EmbeddingCache:
    """`images(encoder, paths)` and `texts(encoder, texts)` through the cache folder; counts hits and misses."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _entry(self, encoder: Any, what: str, digest: str) -> Path:
        return self.folder / encoder.identity[:16] / what / digest[:2] / f"{digest}.npy"

    def _lookup(self, encoder: Any, what: str, content: bytes) -> tuple[Path, np.ndarray | None]:
        """(cache entry, its embedding or None) of `content` (an image file's bytes or a text's)."""
        entry = self._entry(encoder, f"{encoder.kind}-{what}", hashlib.sha256(content).hexdigest())
        try:
            vector = np.load(entry) if entry.is_file() else None
        except (OSError, ValueError):  # a damaged entry is recomputed and overwritten
            vector = None
        self.hits += vector is not None
        return entry, vector

    def _store(self, path: Path, vector: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(vector, np.float32))
        atomic_write_bytes(path, buf.getvalue())

    def images(self, encoder: Any, paths: Sequence[Path], desc: str = "") -> tuple[dict[Path, np.ndarray],
                                                                                   dict[Path, str]]:
        """({path: embedding}, {path: why it was skipped}) for image files (missing or unreadable: skipped)."""
        from tqdm import tqdm

        found, skipped, todo = {}, {}, []
        for path in dict.fromkeys(paths):
            if not path.is_file():
                skipped[path] = "missing"
                continue
            entry, vector = self._lookup(encoder, "image", path.read_bytes())
            if vector is None:
                todo.append((path, entry))
            else:
                found[path] = vector
        bar = tqdm(total=len(todo), desc=desc or f"{encoder.kind} images", unit="img", disable=None)
        for start in range(0, len(todo), encoder.batch_size):
            chunk, images = [], []
            for path, entry in todo[start:start + encoder.batch_size]:
                try:
                    images.append(read_image(path))
                    chunk.append((path, entry))
                except ValueError:
                    skipped[path] = "unreadable"
            if images:
                for (path, entry), vector in zip(chunk, encoder.embed_images(images), strict=True):
                    self._store(entry, vector)
                    found[path] = vector
                    self.misses += 1
            bar.update(len(todo[start:start + encoder.batch_size]))
        bar.close()
        return found, skipped

    def texts(self, encoder: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{text: embedding} for the texts (each encoded once per model)."""
        found, todo = {}, []
        for text in dict.fromkeys(texts):
            entry, vector = self._lookup(encoder, "text", text.encode("utf-8"))
            if vector is None:
                todo.append((text, entry))
            else:
                found[text] = vector
        for start in range(0, len(todo), encoder.batch_size):
            chunk = todo[start:start + encoder.batch_size]
            for (text, entry), vector in zip(chunk, encoder.embed_texts([t for t, _ in chunk]), strict=True):
                self._store(entry, vector)
                found[text] = vector
                self.misses += 1
        return found
