"""Read a reference image for CustomShift: centre-crop to the target aspect, resize, scale to [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_reference_image(path: str | Path, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] from any image file PIL reads (RGB; alpha dropped).

    An unreadable or missing file is a ValueError / FileNotFoundError naming it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image {path}: no such file.")
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"reference image {path} cannot be read as an image ({e}); give a JPEG or PNG.") from None
    w, h = img.size
    target = width / height
    if w / h > target:  # too wide: crop the sides
        new_w = round(h * target)
        box = ((w - new_w) // 2, 0, (w - new_w) // 2 + new_w, h)
    else:  # too tall: crop top and bottom
        new_h = round(w / target)
        box = (0, (h - new_h) // 2, w, (h - new_h) // 2 + new_h)
    img = img.crop(box).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, np.float32) / 127.5 - 1.0  # (H, W, 3)
    return pixels.transpose(2, 0, 1)[None]
