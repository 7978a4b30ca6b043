"""The world's pictures, drawn with Pillow alone: the demo grid (rows: subjects; columns: reference, then each
method) and the trade-off plot (subject consistency against prompt fidelity, one point per method)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from customshift_jax.io.safe_files import save_image

SCALE = 3  # 32 px images drawn at 96 px


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an older Pillow without sized default fonts
        return ImageFont.load_default()


def grid(rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str], row_labels: Sequence[str],
         path: Path) -> Path:
    """A labelled grid of uint8 images (all the same size), upscaled by SCALE with nearest neighbours."""
    h, w = rows[0][0].shape[:2]
    cell, pad, top, left = h * SCALE, 4, 34, 150
    width, height = left + len(column_labels) * (cell + pad), top + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font()
    for j, label in enumerate(column_labels):
        x = left + j * (cell + pad)
        for k, part in enumerate(_wrap(label, 16)[:2]):
            draw.text((x + 2, 2 + 14 * k), part, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + i * (cell + pad)
        for k, part in enumerate(_wrap(row_labels[i], 24)[:6]):
            draw.text((4, y + 4 + 14 * k), part, fill=(0, 0, 0), font=font)
        for j, img in enumerate(row):
            tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + j * (cell + pad), y))
    save_image(canvas, path, "figure")
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def tradeoff_plot(points: dict[str, tuple[float, float]], path: Path, *, xlabel: str = "prompt fidelity",
                  ylabel: str = "subject consistency") -> Path:
    """Scatter of {label: (x, y)} on [0, 1]^2 with gridlines; the CustomShift gamma points joined by a line."""
    size, margin = 560, 70
    canvas = Image.new("RGB", (size + margin + 240, size + margin), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    x0, y0 = margin, size  # origin (pixels)
    span = size - 20
    px = lambda x, y: (x0 + x * span, y0 - y * span)  # noqa: E731
    for t in np.linspace(0, 1, 6):
        draw.line([px(t, 0), px(t, 1)], fill=(225, 225, 225))
        draw.line([px(0, t), px(1, t)], fill=(225, 225, 225))
        draw.text((px(t, 0)[0] - 8, y0 + 6), f"{t:.1f}", fill=(0, 0, 0), font=font)
        draw.text((x0 - 30, px(0, t)[1] - 7), f"{t:.1f}", fill=(0, 0, 0), font=font)
    draw.rectangle([px(0, 1), px(1, 0)], outline=(0, 0, 0))
    draw.text((x0 + span / 2 - 50, y0 + 26), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, 6), ylabel, fill=(0, 0, 0), font=font)
    curve = [px(*v) for k, v in points.items() if k.startswith("customshift gamma")]
    if len(curve) > 1:
        draw.line(curve, fill=(200, 60, 40), width=2)
    colours = [(200, 60, 40), (40, 90, 200), (40, 150, 60), (140, 60, 170), (90, 90, 90), (220, 140, 20)]
    colour = {label: colours[0] if label.startswith("customshift") else colours[1 + i % (len(colours) - 1)]
              for i, label in enumerate(points)}
    for label, (x, y) in points.items():
        cx, cy = px(x, y)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour[label])
    # Labels in a column right of the plot, in the points' vertical order, at least a line apart, each joined to its
    # point by a leader: points that coincide (many methods at prompt fidelity 1.0) stay readable.
    order = sorted(points, key=lambda k: -points[k][1])
    ys: list[float] = []
    for label in order:
        want = px(*points[label])[1] - 7
        ys.append(max(want, ys[-1] + 15) if ys else want)
    overflow = ys[-1] - (y0 - 14) if ys else 0
    ys = [y - max(overflow, 0) for y in ys]  # pushed past the bottom: the column moves up, spacing kept
    label_x = x0 + span + 24
    for label, ly in zip(order, ys):
        cx, cy = px(*points[label])
        draw.line([(cx + 6, cy), (label_x - 3, ly + 7)], fill=colour[label])
        draw.text((label_x, ly), label, fill=colour[label], font=font)
    save_image(canvas, path, "figure")
    return path
