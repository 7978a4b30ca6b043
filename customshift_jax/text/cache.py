"""On-disk cache of SD3 prompt embeddings, so that each prompt is encoded once per encoder set.

Key: (encoder identity, prompt, max_sequence_length, clip_skip). One .npz per prompt, written
atomically (temp file, then rename), so concurrent writers and crashes never leave a partial entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from customshift_jax.io.safe_files import read_npz
from customshift_jax.text.encode import PromptEncoder, _atomic_savez

logger = logging.getLogger(__name__)


class CachedTextEncoder(PromptEncoder):
    """Wraps any encoder with `identity` and `encode_batch` (e.g. `TextEncoders`); same `encode` signature.

    Cache misses are encoded together in one `encode_batch` call; hits never touch the encoders.
    """

    def __init__(self, encoders: Any, cache_dir: str | Path) -> None:
        for attr in ("identity", "encode_batch"):
            if not hasattr(encoders, attr):
                raise TypeError(
                    f"CachedTextEncoder needs an encoder with `{attr}` (like TextEncoders), got {type(encoders)}"
                )
        self.encoders = encoders
        self.cache_dir = Path(cache_dir)
        self.identity = str(encoders.identity)
        self.hits = 0
        self.misses = 0

    def _entry(self, prompt: str, max_sequence_length: int, clip_skip: int | None) -> Path:
        key = json.dumps([self.identity, prompt, int(max_sequence_length), clip_skip], ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.cache_dir / self.identity[:16] / digest[:2] / f"{digest}.npz"

    def _read(self, path: Path, prompt: str) -> tuple[np.ndarray, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            data = read_npz(path, "text cache entry")  # bounded, like every .npz read
            if str(data["prompt"]) != prompt:
                return None
            return np.array(data["prompt_embeds"]), np.array(data["pooled_prompt_embeds"])
        except Exception as e:  # noqa: BLE001 - an unreadable entry is re-encoded and overwritten
            logger.warning("ignoring unreadable cache entry %s (%s); re-encoding", path, e)
            return None

    def encode_batch(
        self, prompts: Sequence[str], *, max_sequence_length: int = 256, clip_skip: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `TextEncoders.encode_batch`, reading cached prompts and encoding only the rest (deduplicated)."""
        prompts = list(prompts)
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for p in dict.fromkeys(prompts):
            hit = self._read(self._entry(p, max_sequence_length, clip_skip), p)
            if hit is not None:
                found[p] = hit
        todo = [p for p in dict.fromkeys(prompts) if p not in found]
        self.hits += len(prompts) - len([p for p in prompts if p in todo])
        self.misses += len(todo)
        if todo:
            embeds, pooled = self.encoders.encode_batch(
                todo, max_sequence_length=max_sequence_length, clip_skip=clip_skip
            )
            for i, p in enumerate(todo):
                e, q = np.asarray(embeds[i], np.float32), np.asarray(pooled[i], np.float32)
                _atomic_savez(
                    self._entry(p, max_sequence_length, clip_skip),
                    {"prompt_embeds": e, "pooled_prompt_embeds": q, "prompt": np.array(p)},
                )
                found[p] = (e, q)
        return (
            np.stack([found[p][0] for p in prompts]).astype(np.float32, copy=False),
            np.stack([found[p][1] for p in prompts]).astype(np.float32, copy=False),
        )
