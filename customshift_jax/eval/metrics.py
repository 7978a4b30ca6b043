"""The scores, from embeddings: DINO / CLIP-I (mean pairwise cosine), CLIP-T (cosine), CLIPScore (w = 2.5).

All in float64 on unit-normalised rows. CLIPScore as Hessel et al. (2021) define it, w * max(cos, 0) with
w = 2.5 (torchmetrics' `clip_score` is the same with w = 100); CustomConcept101 reports it as text alignment.
"""
from __future__ import annotations

import numpy as np

CLIPSCORE_W = 2.5


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float64 rows of norm 1."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) cosines."""
    return unit_rows(a) @ unit_rows(b).T


def mean_pairwise_cosine(generated: np.ndarray, real: np.ndarray) -> float:
    """Mean over all (generated, real) pairs of their cosine: DINO with DINO embeddings, CLIP-I with CLIP's."""
    return float(cosine_matrix(generated, real).mean())


def mean_real_vs_real(real: np.ndarray) -> float:
    """Mean cosine over the pairs of distinct real photos (i != j): the benchmark's ceiling row."""
    c = cosine_matrix(real, real)
    n = len(c)
    if n < 2:
        return float("nan")
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def text_image_cosines(texts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(N, D) prompt embeddings, (N, D) image embeddings -> (N,) cosines of each pair (CLIP-T per image)."""
    return np.sum(unit_rows(texts) * unit_rows(images), axis=-1)


def clipscore(cosines: np.ndarray, w: float = CLIPSCORE_W) -> np.ndarray:
    """CLIPScore of each pair: w * max(cos, 0)."""
    return w * np.maximum(np.asarray(cosines, np.float64), 0.0)
