"""The judge of the procedural world (DESIGN section 8): a small CNN trained on ground-truth renders that reads
the subject factors (subject consistency, the DINO / CLIP-I analogue), the context factors (prompt fidelity,
the CLIP-T analogue) and a continuous identity embedding (cosine of two images' embeddings, the DINO score).

Functional Flax Linen: `Judge` describes the structure, params are a plain pytree, the entry points are pure
functions of (config, params, inputs) with explicit seeds. A context reader sees the whole image; the subject
is cropped from the box that the (predicted) position and size imply and read by a subject reader, so subject
features do not depend on where the subject stands or how big it is. The identity embedding is an
L2-normalised projection of the subject features, trained (on top of them) so that linear heads recover every
subject factor from it and two renders of one identity in different contexts agree.

    config, params = load_judge()                      # the shipped judge
    pred = judge_images(config, params, images)        # images: uint8 (N, 32, 32, 3)
    score(pred, subjects, contexts)["subject_all"]     # all four subject factors right
    identity_cosine(pred["embedding"], other["embedding"])
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from customshift_jax.toyworld import world

FORMAT = "customshift-toyworld-judge-v1"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "judge.npz"
SUBJECT_NAMES: tuple[str, ...] = tuple(world.SUBJECT_FACTORS)
CONTEXT_NAMES: tuple[str, ...] = tuple(world.CONTEXT_FACTORS)
CHUNK = 256  # images per jitted forward call


def _world_factors() -> tuple[tuple[str, int], ...]:
    """(factor name, number of values) for every subject then context factor of the world."""
    all_factors = {**world.SUBJECT_FACTORS, **world.CONTEXT_FACTORS}
    return tuple((name, len(values)) for name, values in all_factors.items())


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Structure of the judge; hashable so it can be a static argument of jitted functions."""

    image_size: int = 32
    patch: int = 2  # space-to-depth first: (32, 32, 3) -> (16, 16, 12) keeps every pixel, 4x cheaper convs
    context_widths: tuple[int, ...] = (16, 32, 64)  # context reader: stem width, then one stage per width
    subject_widths: tuple[int, ...] = (32, 64, 128)  # subject reader, on the subject crop
    groups: int = 8  # GroupNorm groups (0: no normalisation)
    crop_size: int = 24  # the subject crop, resampled to this many pixels a side
    crop_margin: float = 1.4  # crop half-side / the subject's nominal radius (room for jitter and rotation)
    feature_dim: int = 128
    embed_dim: int = 64
    embed_scale: float = 10.0  # logit scale of the auxiliary subject heads that read the unit-norm embedding
    detach_embedding: bool = True  # train the embedding on top of the subject reader, not through it
    factors: tuple[tuple[str, int], ...] = dataclasses.field(default_factory=_world_factors)

    def __post_init__(self):
        """Lists (from JSON or a caller) become tuples, so the config stays hashable."""
        for k in ("context_widths", "subject_widths"):
            object.__setattr__(self, k, tuple(int(w) for w in getattr(self, k)))
        object.__setattr__(self, "factors", tuple((str(n), int(k)) for n, k in self.factors))

    def to_json(self) -> str:
        """The config as a JSON string (saved beside the params)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "JudgeConfig":
        """Inverse of to_json: lists back to tuples."""
        return cls(**json.loads(text))


class _Midpoint:
    """A stand-in rng whose uniform draws are the middle of their range: world.placement without jitter."""

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return (low + high) / 2


def nominal_boxes(margin: float) -> np.ndarray:
    """(positions, sizes, 3) subject crop boxes (centre x, centre y, half-side) in image fractions, from the
    world's own placement rule with the jitter at its mean."""
    out = np.zeros((len(world.POSITIONS), len(world.SIZES), 3), np.float32)
    for p in range(len(world.POSITIONS)):
        for s in range(len(world.SIZES)):
            cx, cy, radius, _ = world.placement(world.Context(0, p, s), _Midpoint())
            out[p, s] = (cx, cy, margin * radius)
    return out


def _interp_matrix(centre: jax.Array, half: jax.Array, n_out: int, n_in: int) -> jax.Array:
    """Bilinear resampling rows along one axis: centre, half (B,) in pixels -> (B, n_out, n_in)."""
    t = (jnp.arange(n_out) + 0.5) / n_out * 2 - 1  # (n_out,) output pixel centres in [-1, 1]
    src = jnp.clip(centre[:, None] + half[:, None] * t - 0.5, 0, n_in - 1)  # (B, n_out), input index space
    return jnp.maximum(0.0, 1 - jnp.abs(src[..., None] - jnp.arange(n_in)))


def crop(x: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Resample the square box (centre x, centre y, half-side; image fractions) of each image to size x size
    (edges clamped). x: (B, H, W, C), boxes: (B, 3) -> (B, size, size, C)."""
    _, h, w, _ = x.shape
    ry = _interp_matrix(boxes[:, 1] * h, boxes[:, 2] * h, size, h)  # (B, size, H)
    rx = _interp_matrix(boxes[:, 0] * w, boxes[:, 2] * w, size, w)  # (B, size, W)
    return jnp.einsum("boh,bhwc,bpw->bopc", ry, x, rx)


class ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm -> SiLU."""

    width: int
    stride: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), strides=(self.stride, self.stride), padding=1)(x)
        return nn.silu(nn.GroupNorm(num_groups=self.groups)(x) if self.groups else x)


class Reader(nn.Module):
    """A small CNN: space-to-depth, coordinate channels, conv stages with stride-2 downsampling, then mean and
    max pooling and a dense layer. (B, H, W, C) -> (B, F)."""

    widths: tuple[int, ...]
    patch: int
    groups: int
    feature_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch
        h, w = h // p, w // p
        x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, p * p * c)  # (B, h, w, p*p*C)
        yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
        coords = jnp.broadcast_to(jnp.stack([xx, yy], -1), (b, h, w, 2))  # position is a label: give it
        x = jnp.concatenate([x * 2 - 1, coords], -1)  # (B, h, w, p*p*C + 2)
        x = ConvBlock(self.widths[0], 1, self.groups)(x)
        for width in self.widths[1:]:
            x = ConvBlock(width, 2, self.groups)(x)
            x = ConvBlock(width, 1, self.groups)(x)
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)  # (B, 2C)
        return nn.silu(nn.Dense(self.feature_dim, name="features")(pooled))  # (B, F)


class Judge(nn.Module):
    """Images in [0, 1] -> {"logits": {factor: (B, K)}, "embed_logits": {subject factor: (B, K)},
    "embedding": (B, E), "boxes": (B, 3)}.

    A context reader sees the whole image and reads scene, position and size; the subject is then cropped from
    the box its position and size imply (the true ones in training, the predicted ones otherwise) and a
    subject reader reads the crop, so subject features are position- and size-normalised."""

    config: JudgeConfig

    def _reader(self, widths: tuple[int, ...], name: str) -> Reader:
        cfg = self.config
        return Reader(widths, cfg.patch, cfg.groups, cfg.feature_dim, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, boxes: jax.Array | None = None) -> dict:
        cfg = self.config
        k = dict(cfg.factors)
        ctx = self._reader(cfg.context_widths, "context_reader")(x)  # (B, F)
        logits = {name: nn.Dense(k[name], name=f"head_{name}")(ctx) for name in CONTEXT_NAMES}
        if boxes is None:
            table = jnp.asarray(nominal_boxes(cfg.crop_margin))  # (P, S, 3)
            boxes = table[jnp.argmax(logits["position"], -1), jnp.argmax(logits["size"], -1)]  # (B, 3)
        sub = self._reader(cfg.subject_widths, "subject_reader")(crop(x, boxes, cfg.crop_size))  # (B, F)
        logits.update({name: nn.Dense(k[name], name=f"head_{name}")(sub) for name in SUBJECT_NAMES})
        # the embedding is a read-out of the subject features; its losses do not shape the reader
        emb = nn.Dense(cfg.embed_dim, name="embed")(jax.lax.stop_gradient(sub) if cfg.detach_embedding else sub)
        emb = emb / jnp.sqrt(jnp.sum(emb * emb, -1, keepdims=True) + 1e-12)  # (B, E), unit norm
        embed_logits = {name: nn.Dense(k[name], name=f"embed_head_{name}")(emb * cfg.embed_scale)
                        for name in SUBJECT_NAMES}  # the embedding must carry every subject factor
        return {"logits": {name: logits[name] for name, _ in cfg.factors}, "embed_logits": embed_logits,
                "embedding": emb, "boxes": boxes}


def init_params(config: JudgeConfig, seed: int = 0) -> dict:
    """Fresh params (a plain pytree) for `config`."""
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return Judge(config).init(jax.random.PRNGKey(seed), x)["params"]


def _to_unit(images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


# ---------------------------------------------------------------------------------------------------- data

def _render_pool(subjects: list[world.Subject], per_subject: int, seed: int, size: int = 32, show: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-rendered training images: (S, P, H, W, 3) uint8, subject labels (S, 4), context labels (S, P, 3)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    contexts = [[world.random_context(rng) for _ in range(per_subject)] for _ in subjects]
    items = [(s, c) for s, cs in zip(subjects, contexts) for c in cs]
    seeds = np.random.SeedSequence(seed + 1).spawn(len(items))
    images = np.empty((len(items), size, size, 3), np.uint8)
    for i in tqdm(range(len(items)), desc="render pool", file=sys.stderr, disable=not show, mininterval=2):
        s, c = items[i]
        images[i] = world.render(s, c, size, np.random.default_rng(seeds[i]))
    sub = np.array([[getattr(s, k) for k in SUBJECT_NAMES] for s in subjects], np.int32)  # (S, 4)
    ctx = np.array([[[getattr(c, k) for k in CONTEXT_NAMES] for c in cs] for cs in contexts], np.int32)
    return images.reshape(len(subjects), per_subject, size, size, 3), sub, ctx


def _sample_pairs(pool: tuple, half: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A batch of `half` identities x 2 renders in different contexts: images (2*half, H, W, 3), labels."""
    images, sub, ctx = pool
    n, per = images.shape[:2]
    ids = rng.choice(n, half, replace=False)
    j1 = rng.integers(per, size=half)
    j2 = (j1 + rng.integers(1, per, size=half)) % per
    ids2, js = np.concatenate([ids, ids]), np.concatenate([j1, j2])
    labels = {k: sub[ids2, i] for i, k in enumerate(SUBJECT_NAMES)}
    labels.update({k: ctx[ids2, js, i] for i, k in enumerate(CONTEXT_NAMES)})
    return images[ids2, js], labels


def _blur3(x: jax.Array) -> jax.Array:
    """Separable [1, 2, 1] / 4 blur with edge padding; (B, H, W, C) -> same."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    v = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (v[:, :, :-2] + 2 * v[:, :, 1:-1] + v[:, :, 2:]) / 4


def _shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to `max_shift` pixels (edge padding); far below the position spacing (~7 px).
    x: (B, H, W, C) -> same."""
    b, h, w, _ = x.shape
    m = max_shift
    p = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * m + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(p, offsets)


def augment(key: jax.Array, x: jax.Array, max_shift: int = 1) -> jax.Array:
    """Mild corruptions like those of generated / VAE-decoded images (shift, softening, noise, tint) that also
    keep the reader from memorising renders; no flips, since left/right is a label. x: (B, H, W, 3) in [0, 1]."""
    b = x.shape[0]
    k_shift, k_blur, k_gain, k_bias, k_chan, k_sig, k_noise = jax.random.split(key, 7)
    if max_shift:
        x = _shift(k_shift, x, max_shift)
    alpha = jax.random.uniform(k_blur, (b, 1, 1, 1), maxval=0.35)
    x = (1 - alpha) * x + alpha * _blur3(x)
    gain = 1 + jax.random.uniform(k_gain, (b, 1, 1, 1), minval=-0.04, maxval=0.04)
    chan = 1 + jax.random.uniform(k_chan, (b, 1, 1, 3), minval=-0.02, maxval=0.02)
    bias = jax.random.uniform(k_bias, (b, 1, 1, 1), minval=-0.02, maxval=0.02)
    sigma = jax.random.uniform(k_sig, (b, 1, 1, 1), maxval=0.02)
    x = x * gain * chan + bias + sigma * jax.random.normal(k_noise, x.shape)
    return jnp.clip(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- training

def true_boxes(key: jax.Array, config: JudgeConfig, labels: dict, jitter: float = 0.02) -> jax.Array:
    """Crop boxes (B, 3) from the true position and size, jittered a little (centre +-jitter, half-side
    *(1 +- 2.5 jitter)) so the subject reader tolerates imprecise placement."""
    table = jnp.asarray(nominal_boxes(config.crop_margin))
    boxes = table[labels["position"], labels["size"]]  # (B, 3)
    u = jax.random.uniform(key, boxes.shape, minval=-1.0, maxval=1.0)
    return boxes + jnp.stack([u[:, 0] * jitter, u[:, 1] * jitter, boxes[:, 2] * u[:, 2] * 2.5 * jitter], -1)


def loss_fn(config: JudgeConfig, params: dict, x: jax.Array, labels: dict, pair_weight: float,
            boxes: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Cross-entropy summed over the heads and the embedding's subject heads + pair loss (1 - cosine of the two
    renders of each identity, the first and second half of the batch)."""
    out = Judge(config).apply({"params": params}, x, boxes)
    metrics, total = {}, 0.0
    for name, _ in config.factors:
        logits = out["logits"][name]
        total = total + optax.softmax_cross_entropy_with_integer_labels(logits, labels[name]).mean()
        metrics[name] = jnp.mean(jnp.argmax(logits, -1) == labels[name])
    for name, logits in out["embed_logits"].items():
        total = total + optax.softmax_cross_entropy_with_integer_labels(logits, labels[name]).mean()
    e = out["embedding"]  # (2 * half, E)
    half = e.shape[0] // 2
    pair = jnp.mean(1 - jnp.sum(e[:half] * e[half:], -1))
    metrics["pair"] = pair
    return total + pair_weight * pair, metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _train_step(config: JudgeConfig, tx: optax.GradientTransformation, params: dict, opt_state,
                key: jax.Array, images: jax.Array, labels: dict, pair_weight: float):
    """One adam step on an augmented batch; returns (params, opt_state, loss, metrics)."""
    k_aug, k_box = jax.random.split(key)
    x = augment(k_aug, _to_unit(images))
    boxes = true_boxes(k_box, config, labels)
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(config, p, x, labels, pair_weight, boxes), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics


def train_judge(steps: int = 1500, batch: int = 64, seed: int = 0, log: Callable[[str], None] | None = None,
                config: JudgeConfig | None = None, per_subject: int = 8, lr: float = 3e-3,
                pair_weight: float = 0.3, pool: tuple | None = None, progress: bool = True,
                log_every: int = 250) -> tuple[JudgeConfig, dict]:
    """Train a judge on renders of the TRAINING identities of split_subjects(0) in random contexts; a pool of
    `per_subject` renders per identity is drawn once, batches are identity pairs from it, augmented on device.
    `log` gets progress lines (default: tqdm.write, which keeps them clear of the progress bar)."""
    from tqdm import tqdm

    log = log or tqdm.write
    if batch < 2 or batch % 2:
        raise ValueError(f"batch={batch}: must be an even number >= 2 (identity pairs).")
    config = config or JudgeConfig()
    train_ids, _ = world.split_subjects(0)
    t0 = time.time()
    if pool is None:
        pool = _render_pool(train_ids, per_subject, seed, config.image_size, show=progress)
        log(f"rendered {pool[0].shape[0] * pool[0].shape[1]} training images in {time.time() - t0:.1f}s")
    params = init_params(config, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), max(steps, 2), lr * 0.02)
    tx = optax.adam(sched)
    opt_state = tx.init(params)
    rng, key = np.random.default_rng(seed + 7), jax.random.PRNGKey(seed)
    t1 = time.time()
    running: list[dict] = []
    bar = tqdm(range(steps), desc="train judge", file=sys.stderr, disable=not progress, mininterval=2)
    for step in bar:
        images, labels = _sample_pairs(pool, batch // 2, rng)
        key, sub = jax.random.split(key)
        params, opt_state, loss, metrics = _train_step(config, tx, params, opt_state, sub, jnp.asarray(images),
                                                       {k: jnp.asarray(v) for k, v in labels.items()},
                                                       pair_weight)
        running.append(metrics)
        if step % 50 == 0 or step == steps - 1:
            worst = min((float(metrics[n]), n) for n, _ in config.factors)
            bar.set_postfix(loss=f"{float(loss):.3f}", worst=f"{worst[1]}={worst[0]:.2f}")
        if log_every and ((step + 1) % log_every == 0 or step == steps - 1):
            mean = {k: float(np.mean([float(m[k]) for m in running])) for k in running[0]}
            log(f"step {step + 1}: train acc " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
            running = []
    log(f"trained {steps} steps (batch {batch}) in {time.time() - t1:.1f}s")
    return config, params


# ---------------------------------------------------------------------------------------------------- inference

@functools.partial(jax.jit, static_argnums=0)
def _forward(config: JudgeConfig, params: dict, images: jax.Array) -> dict:
    """uint8 (B, H, W, 3) -> {"probs": {factor: (B, K)}, "embedding": (B, E)}."""
    out = Judge(config).apply({"params": params}, _to_unit(images))
    return {"probs": {k: jax.nn.softmax(v, -1) for k, v in out["logits"].items()}, "embedding": out["embedding"]}


def judge_images(config: JudgeConfig, params: dict, images: np.ndarray) -> dict:
    """Read images: {factor: predicted index (N,), "probs": {factor: (N, K)}, "embedding": (N, E)}."""
    images = np.asarray(images)
    s = config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
        raise ValueError(f"judge_images expects uint8 images of shape (N, {s}, {s}, 3), got {images.dtype} "
                         f"{images.shape}; convert floats in [0, 1] with np.round(x * 255).astype(np.uint8).")
    n = images.shape[0]
    chunk = CHUNK if n >= CHUNK else max(8, 1 << max(n - 1, 0).bit_length())  # padded: few compiled shapes
    parts = []
    for i in range(0, max(n, 1), chunk):  # an empty input still runs once, for the output structure
        x = images[i:i + chunk]
        m = x.shape[0]
        x = np.concatenate([x, np.zeros((chunk - m, s, s, 3), np.uint8)])  # (chunk, H, W, 3)
        out = jax.device_get(_forward(config, params, jnp.asarray(x)))
        parts.append(jax.tree_util.tree_map(lambda a: np.asarray(a[:m]), out))
    out = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)
    pred = {name: np.argmax(out["probs"][name], -1) for name, _ in config.factors}
    return {**pred, "probs": out["probs"], "embedding": out["embedding"]}


def correct(pred: dict, subjects: list[world.Subject], contexts: list[world.Context]) -> dict[str, np.ndarray]:
    """Per image, whether each factor was read right ((N,) bool each), plus "subject_all" and "context_all"."""
    n = len(pred[SUBJECT_NAMES[0]])
    if len(subjects) != n or len(contexts) != n:
        raise ValueError(f"score: {n} predictions but {len(subjects)} subjects and {len(contexts)} contexts; "
                         "pass one true Subject and Context per judged image.")
    right = {k: np.asarray(pred[k]) == np.array([getattr(s, k) for s in subjects]) for k in SUBJECT_NAMES}
    right.update({k: np.asarray(pred[k]) == np.array([getattr(c, k) for c in contexts]) for k in CONTEXT_NAMES})
    right["subject_all"] = np.all([right[k] for k in SUBJECT_NAMES], 0)
    right["context_all"] = np.all([right[k] for k in CONTEXT_NAMES], 0)
    return right


def score(pred: dict, subjects: list[world.Subject], contexts: list[world.Context]) -> dict:
    """Per-factor accuracy plus "subject_all" (all four subject factors right) and "context_all" (all three)."""
    return {k: float(np.mean(v)) for k, v in correct(pred, subjects, contexts).items()}


def identity_cosine(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, E) embedding arrays -> (N,) (the DINO-score analogue)."""
    a, b = np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"identity_cosine expects two (N, E) arrays of one shape, got {a.shape} and {b.shape}.")
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return np.sum(a * b, -1) / np.maximum(na * nb, 1e-12)


def heldout_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[world.Subject], list[world.Context]]:
    """`n` clean renders of HELD-OUT identities of split_subjects(0) in random contexts: (images, subjects,
    contexts)."""
    _, held = world.split_subjects(0)
    rng = np.random.default_rng(seed)
    subjects = [held[i] for i in rng.integers(len(held), size=n)]
    contexts = [world.random_context(rng) for _ in range(n)]
    return world.render_batch(zip(subjects, contexts), seed=seed + 1), subjects, contexts


def evaluate(config: JudgeConfig, params: dict, n: int = 1000, seed: int = 12345) -> dict:
    """score() of the judge on `n` clean renders of held-out identities."""
    images, subjects, contexts = heldout_set(n, seed)
    return score(judge_images(config, params, images), subjects, contexts)


# ---------------------------------------------------------------------------------------------------- files

def save_judge(path: str | Path, config: JudgeConfig, params: dict) -> Path:
    """Write config + params to ONE .npz file, atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    arrays = {f"param/{k}": np.asarray(v, np.float32) for k, v in flat.items()}
    arrays["__format__"] = np.array(FORMAT)
    arrays["__config__"] = np.array(config.to_json())
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shipped judge is readable by all
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_judge(path: str | Path = DEFAULT_WEIGHTS) -> tuple[JudgeConfig, dict]:
    """Read a file written by save_judge -> (config, params); a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no judge file there; train one with `python -m "
                                f"customshift_jax.toyworld.judge train --out {path}`.")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        fmt = str(files.pop("__format__"))
        if fmt != FORMAT:
            raise ValueError(f"format {fmt!r}, expected {FORMAT!r}")
        config = JudgeConfig.from_json(str(files.pop("__config__")))
        flat = {k[len("param/"):]: v for k, v in files.items() if k.startswith("param/")}
        expected = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(config)), sep="/")
        if set(flat) != set(expected):
            missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
            raise ValueError(f"param names differ from the config's judge (missing {missing[:3]}, extra {extra[:3]})")
        for k, v in flat.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"param {k} has shape {v.shape}, expected {expected[k].shape}")
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable judge file ({msg}); re-save it with save_judge or retrain "
                         f"with `python -m customshift_jax.toyworld.judge train --out {path}`.") from None
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return config, params


# ---------------------------------------------------------------------------------------------------- CLI

def _print_scores(scores: dict, n: int) -> None:
    """One line per factor, then the all-right rates."""
    print(f"accuracy on {n} clean renders of held-out identities:")
    for k, v in scores.items():
        print(f"  {k:12s} {v:.4f}")


def main(argv: list[str] | None = None) -> int:
    """`train --out PATH [--steps N] [--seed S]` or `eval --judge PATH [--n N]`."""
    ap = argparse.ArgumentParser(prog="python -m customshift_jax.toyworld.judge", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a judge on renders of training identities and save it")
    tr.add_argument("--out", required=True, help="where to write the judge (.npz)")
    tr.add_argument("--steps", type=int, default=1500)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--batch", type=int, default=64)
    tr.add_argument("--per-subject", type=int, default=8, help="pre-rendered contexts per training identity")
    tr.add_argument("--n", type=int, default=1000, help="held-out renders to evaluate on after training")
    ev = sub.add_parser("eval", help="per-factor accuracy on clean renders of held-out identities")
    ev.add_argument("--judge", default=str(DEFAULT_WEIGHTS), help="a judge file (default: the shipped one)")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.cmd == "train":
        config, params = train_judge(args.steps, args.batch, args.seed, per_subject=args.per_subject)
        print(f"saved {save_judge(args.out, config, params)} (train wall time {time.time() - t0:.1f}s)")
        if args.n:
            _print_scores(evaluate(config, params, args.n), args.n)
    else:
        try:
            config, params = load_judge(args.judge)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _print_scores(evaluate(config, params, args.n, args.seed), args.n)
    print(f"wall time {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
