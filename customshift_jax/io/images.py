"""Reading images safely: only regular files, within a byte and a pixel limit, every PIL mode to RGB correctly
(16-bit scaled, not clipped; transparency over white), and the reference crop for CustomShift."""
from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from customshift_jax.io.safe_files import read_regular_file

DEFAULT_MAX_BYTES = 64 * 2**20  # a 64 MiB file: far above any photo; a FIFO or /dev/zero is refused before this
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP (e.g. 8000 x 5000): above DreamBench's and Subjects200K's photos
DEFAULT_MAX_ASPECT = 10.0  # a 1 x 4000 strip has no square to crop
DECODED_BYTES_PER_PIXEL = 3  # the decoded image may take max_pixels x 3 bytes (RGB at the pixel limit)
ROW_BLOCK_BYTES = 16 << 20  # the mode conversion's float temporaries: about this much at a time


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What an input image may be: bytes on disk, width x height, and long side / short side."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT


def read_image_bytes(path: str | Path, limits: ImageLimits = ImageLimits(),
                     opener: Callable[[str], Any] | None = None) -> bytes:
    """The file's bytes, from a regular file of at most `limits.max_bytes` (`read_regular_file`)."""
    return read_regular_file(path, limits.max_bytes, "image", "--max-image-bytes", opener)


def decode_image(data: bytes, name: Any, limits: ImageLimits = ImageLimits()):
    """A fully decoded PIL RGB image; the pixel and aspect limits are checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # PIL's bomb warning: our own limit is checked next, from the same header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ValueError(f"image {name} is {w}x{h} = {w * h} pixels, above the limit of {limits.max_pixels} "
                                 "(--max-image-pixels); downscale it or raise the limit.")
            if max(w, h) > limits.max_aspect * min(w, h):
                raise ValueError(f"image {name} is {w}x{h}: its sides differ by more than {limits.max_aspect:g}x, so "
                                 "a centre crop would keep almost nothing; crop it first.")
            decoded = w * h * mode_bytes(img.mode)
            if decoded > limits.max_pixels * DECODED_BYTES_PER_PIXEL:
                raise ValueError(f"image {name} is {w}x{h} {img.mode}: it decodes to {decoded} bytes, above the limit "
                                 f"of {limits.max_pixels * DECODED_BYTES_PER_PIXEL} (--max-image-pixels x "
                                 f"{DECODED_BYTES_PER_PIXEL}); downscale it or raise the limit.")
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError:  # PIL's own guard, far above ours unless the limit was raised
        raise ValueError(f"image {name} has more pixels than PIL decodes safely; it is above --max-image-pixels "
                         f"{limits.max_pixels} too. Downscale it.") from None
    except UnidentifiedImageError:  # its text names PIL's in-memory buffer, not the file
        raise ValueError(f"image {name} cannot be read as an image: it is not an image in any format PIL reads "
                         "(JPEG, PNG, WebP, ...); give an image file.") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"image {name} cannot be read as an image ({e}); give a JPEG or PNG.") from None


def mode_bytes(mode: str) -> int:
    """Bytes a pixel of PIL `mode` takes decoded (bands x sample size; 1 for bilevel "1")."""
    from PIL import ImageMode

    try:
        m = ImageMode.getmode(mode)
        return len(m.bands) * max(1, np.dtype(m.typestr).itemsize)
    except (KeyError, TypeError, ValueError):  # a mode PIL cannot describe: count it as wide as any
        return 8


def _rows(h: int, w: int, bytes_per_pixel: int = 64) -> int:
    """Rows per block so a block's float temporaries stay near ROW_BLOCK_BYTES."""
    return max(1, ROW_BLOCK_BYTES // max(1, w * bytes_per_pixel))


def to_rgb(img: Any):
    """Any PIL mode as RGB uint8. 16- and 32-bit integer samples span 0..65535 (scaled by 1/257, as a 16-bit PNG
    means them); float ("F") samples span 0..1; transparency (alpha, or a palette's transparent entry) is
    composited over white. PIL's own `convert("RGB")` clips 16-bit samples, turning such images white. The
    arithmetic runs over blocks of rows, so its float temporaries stay small whatever the image size."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    w, h = img.size
    step = _rows(h, w)
    if mode.startswith("I") or mode == "F":
        gray = np.empty((h, w), np.uint8)
        for r in range(0, h, step):  # a block of rows at a time: no full-size copy or float temporaries
            block = np.asarray(img.crop((0, r, w, min(h, r + step)))).astype(np.float64)
            block = block * 255.0 if mode == "F" else block / 257.0
            gray[r:r + step] = np.clip(np.round(block), 0, 255)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    if mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
        img = img.convert("LA")
    out = np.empty((h, w, 3), np.uint8)
    for r in range(0, h, step):
        block = np.asarray(img.crop((0, r, w, min(h, r + step))).convert("RGBA")).astype(np.float64)
        alpha = block[..., 3:] / 255.0
        out[r:r + step] = np.round(block[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return Image.fromarray(out)


def read_image(path: str | Path, limits: ImageLimits = ImageLimits(), opener: Callable[[str], Any] | None = None):
    """`read_image_bytes` then `decode_image`: a PIL RGB image from a bounded, regular file."""
    return decode_image(read_image_bytes(path, limits, opener), path, limits)


def load_reference_image(path: str | Path, height: int, width: int,
                         limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] from any image file PIL reads, centre-cropped to the aspect.

    An unreadable, missing, oversized or non-regular file is a ValueError / FileNotFoundError naming it.
    """
    path = Path(path)
    try:
        img = read_image(path, limits)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"reference {e}") from None
    return reference_pixels(img, height, width)


def reference_pixels(img: Any, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] from an RGB PIL image: centre-cropped to the aspect, resized
    (bicubic). What `load_reference_image` does after reading the file."""
    from PIL import Image

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
