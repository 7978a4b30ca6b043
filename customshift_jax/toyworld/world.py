"""The procedural subject world (DESIGN section 8): subjects drawn from factors, contexts that prompts control,
DreamBench-style captions, and a seeded split of identities into training and held-out sets.

A subject is (silhouette, body colour, accent colour, pattern); its name is the silhouette's class word. A
context is (scene, position, size). Captions name the class word and the context only, so a text-to-image
model cannot know a subject's colours or pattern: only a reference image can carry them.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable

import numpy as np

SILHOUETTES: tuple[str, ...] = ("ball", "box", "star", "heart", "cone", "kite", "cross", "moon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 225, 40), "green": (40, 170, 60),
    "cyan": (40, 205, 225), "blue": (40, 80, 225), "purple": (140, 50, 200), "pink": (245, 125, 195),
    "white": (245, 245, 245), "black": (25, 25, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checker", "ring")
SCENES: tuple[str, ...] = ("on the beach", "in the snow", "at night", "on grass", "in front of a brick wall",
                           "in the desert", "on a wooden floor", "under the sea")
POSITIONS: tuple[str, ...] = ("left", "centre", "right")
SIZES: tuple[str, ...] = ("small", "large")

SUBJECT_FACTORS: dict[str, tuple[str, ...]] = {"silhouette": SILHOUETTES, "body": COLOUR_NAMES,
                                               "accent": COLOUR_NAMES, "pattern": PATTERNS}
CONTEXT_FACTORS: dict[str, tuple[str, ...]] = {"scene": SCENES, "position": POSITIONS, "size": SIZES}
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


@dataclasses.dataclass(frozen=True)
class Subject:
    """An identity: indices into SILHOUETTES, COLOUR_NAMES (body, accent; never equal) and PATTERNS."""

    silhouette: int
    body: int
    accent: int
    pattern: int

    @property
    def name(self) -> str:
        """The subject name a user types: the silhouette's class word ("ball", "star", ...)."""
        return SILHOUETTES[self.silhouette]

    def factors(self) -> dict[str, str]:
        """Factor name -> value name, e.g. {"silhouette": "star", "body": "red", ...}."""
        return {k: names[getattr(self, k)] for k, names in SUBJECT_FACTORS.items()}

    def describe(self) -> dict:
        """JSON-ready: the factor names plus the body and accent colours as RGB."""
        return {**self.factors(), "body_rgb": list(COLOURS[COLOUR_NAMES[self.body]]),
                "accent_rgb": list(COLOURS[COLOUR_NAMES[self.accent]])}


@dataclasses.dataclass(frozen=True)
class Context:
    """What a prompt controls: indices into SCENES, POSITIONS and SIZES."""

    scene: int
    position: int
    size: int

    def factors(self) -> dict[str, str]:
        """Factor name -> value name, e.g. {"scene": "on the beach", "position": "left", "size": "small"}."""
        return {k: names[getattr(self, k)] for k, names in CONTEXT_FACTORS.items()}


def caption(subject: Subject | str, context: Context) -> str:
    """DreamBench-style prompt: "a {class word} {scene}, {position}, {size}"."""
    name = subject if isinstance(subject, str) else subject.name
    f = context.factors()
    return f"a {name} {f['scene']}, {f['position']}, {f['size']}"


def all_subjects() -> list[Subject]:
    """Every identity (body != accent), in a fixed order."""
    n = len(COLOUR_NAMES)
    return [Subject(s, b, a, p) for s, b, a, p in itertools.product(range(len(SILHOUETTES)), range(n), range(n),
                                                                    range(len(PATTERNS))) if a != b]


def all_contexts() -> list[Context]:
    """Every context, in a fixed order."""
    return [Context(*c) for c in itertools.product(range(len(SCENES)), range(len(POSITIONS)), range(len(SIZES)))]


def split_subjects(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[Subject], list[Subject]]:
    """(training identities, held-out identities): a seeded permutation of all identities. Held-out ones are new
    combinations of factor values that all occur in training."""
    subjects = all_subjects()
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_held = int(round(heldout_fraction * len(subjects)))
    held = [subjects[i] for i in sorted(order[:n_held])]
    train = [subjects[i] for i in sorted(order[n_held:])]
    return train, held


def random_context(rng: np.random.Generator) -> Context:
    """A uniformly drawn context."""
    return Context(int(rng.integers(len(SCENES))), int(rng.integers(len(POSITIONS))), int(rng.integers(len(SIZES))))


def sentences() -> list[str]:
    """Every caption and subject name of the world (the text the toy tokenizers are trained on)."""
    out = [caption(name, c) for name in SILHOUETTES for c in all_contexts()]
    return out + list(SILHOUETTES) + [""]


# ---------------------------------------------------------------------------------------------------- drawing

def _silhouette_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test on subject coordinates (u right, v up, the shape fills about [-1, 1]^2)."""
    r, th = np.hypot(u, v), np.arctan2(v, u)
    if kind == "ball":
        return r <= 0.95
    if kind == "box":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if kind == "star":
        k = (th - np.pi / 2) * 5 / (2 * np.pi)
        frac = np.abs(k - np.round(k)) * 2  # 0 at a point, 1 between points
        return r <= 1.0 - 0.42 * frac
    if kind == "heart":
        x, y = u * 1.25, v * 1.25 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if kind == "cone":
        return (v >= -0.85) & (v <= 0.95) & (np.abs(u) <= 0.9 * (0.95 - v) / 1.8)
    if kind == "kite":
        return np.abs(u) / 0.7 + np.abs(v) <= 1.0
    if kind == "cross":
        return ((np.abs(u) <= 0.42) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.42) & (np.abs(u) <= 0.95))
    if kind == "moon":
        return (r <= 0.95) & (np.hypot(u - 0.55, v - 0.25) > 0.6)
    raise ValueError(f"unknown silhouette {kind!r}; expected one of {SILHOUETTES}")


def _pattern_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the accent colour shows inside the body (subject coordinates; coarse, about two periods across, so
    that a pattern survives 32 px and the VAE)."""
    if kind == "solid":
        return np.zeros(u.shape, bool)
    if kind == "stripes":
        return np.mod(v * 1.25 + 0.25, 1.0) < 0.5
    if kind == "dots":
        return np.hypot(np.mod(u * 1.1, 1.0) - 0.5, np.mod(v * 1.1, 1.0) - 0.5) < 0.3
    if kind == "checker":
        return (np.floor(u * 1.1) + np.floor(v * 1.1)) % 2 == 0
    if kind == "ring":
        r = np.hypot(u, v)
        return (r > 0.28) & (r < 0.58)
    raise ValueError(f"unknown pattern {kind!r}; expected one of {PATTERNS}")


def _background(scene: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, n, 3) float background of a scene, y down, with small random variation."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.zeros((n, n, 3), np.float32)
    horizon = 0.45 + rng.uniform(-0.05, 0.05)

    def fill(mask, rgb):
        img[mask] = np.asarray(rgb, np.float32)

    if scene == "on the beach":
        fill(y < horizon, (135, 200, 240))
        fill((y >= horizon) & (y < horizon + 0.1), (40, 110, 190))
        fill(y >= horizon + 0.1, (232, 205, 140))
    elif scene == "in the snow":
        fill(y < horizon, (180, 190, 205))
        fill(y >= horizon, (236, 242, 250))
    elif scene == "at night":
        fill(y >= 0, (15, 20, 55))
        for _ in range(6):
            cy, cx = rng.uniform(0, 0.5), rng.uniform(0, 1)
            fill(np.hypot(x - cx, y - cy) < 0.012, (250, 250, 210))
    elif scene == "on grass":
        fill(y < horizon, (150, 205, 245))
        fill(y >= horizon, (70, 150, 50))
    elif scene == "in front of a brick wall":
        rows = np.floor(y * 8)
        brick = (np.mod(y * 8, 1.0) < 0.16) | (np.mod(x * 4 + 0.5 * (rows % 2), 1.0) < 0.08)
        fill(~brick, (165, 70, 50))
        fill(brick, (205, 195, 185))
        fill(y > 0.85, (120, 120, 125))
    elif scene == "in the desert":
        dune = horizon + 0.05 * np.sin(x * 6.0 + rng.uniform(0, 6.3))
        fill(y < dune, (250, 232, 175))
        fill(y >= dune, (222, 150, 70))
    elif scene == "on a wooden floor":
        fill(y < horizon, (226, 212, 182))
        planks = np.mod(x * 5 + 0.3 * np.floor(y * 6), 1.0) < 0.06
        fill((y >= horizon) & ~planks, (150, 100, 60))
        fill((y >= horizon) & planks, (105, 65, 35))
    elif scene == "under the sea":
        top, bottom = np.array([30, 120, 160], np.float32), np.array([10, 45, 90], np.float32)
        img[:] = top + (bottom - top) * y[..., None]
        for _ in range(4):
            cy, cx = rng.uniform(0.05, 0.9), rng.uniform(0, 1)
            ring = np.abs(np.hypot(x - cx, y - cy) - 0.025) < 0.007
            fill(ring, (170, 220, 235))
    else:
        raise ValueError(f"unknown scene {scene!r}; expected one of {SCENES}")
    img += rng.normal(0, 4.0, (1, 1, 3)).astype(np.float32)  # a small global tint
    return img


def placement(context: Context, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(centre x, centre y, radius, rotation) in image fractions for a context, with small jitter."""
    large = SIZES[context.size] == "large"
    radius = (0.34 if large else 0.22) * rng.uniform(0.93, 1.07)
    offset = 0.16 if large else 0.25
    cx = 0.5 + offset * (context.position - 1) + rng.uniform(-0.025, 0.025)
    cy = (0.56 if large else 0.62) + rng.uniform(-0.03, 0.03)
    return cx, cy, radius, rng.uniform(-0.18, 0.18)


def render(subject: Subject, context: Context, size: int = 32, rng: np.random.Generator | int | None = None
           ) -> np.ndarray:
    """The subject in the context as an RGB uint8 image (size, size, 3), with jitter in pose and placement."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = size * SUPERSAMPLE
    img = _background(SCENES[context.scene], n, rng)
    cx, cy, radius, rot = placement(context, rng)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    dx, dy = (x - cx) / radius, -(y - cy) / radius  # v up
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    kind = SILHOUETTES[subject.silhouette]
    inside = _silhouette_mask(kind, u, v)
    core = _silhouette_mask(kind, u / 0.8, v / 0.8)  # the body; the band between is the accent outline
    accent = inside & (~core | _pattern_mask(PATTERNS[subject.pattern], u, v))
    img[inside] = np.asarray(COLOURS[COLOUR_NAMES[subject.body]], np.float32)
    img[accent] = np.asarray(COLOURS[COLOUR_NAMES[subject.accent]], np.float32)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_batch(items: Iterable[tuple[Subject, Context]], size: int = 32, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: each (subject, context) rendered with its own jitter stream from `seed`."""
    items = list(items)
    seeds = np.random.SeedSequence(seed).spawn(len(items))
    return np.stack([render(s, c, size, np.random.default_rng(q)) for (s, c), q in zip(items, seeds)])
