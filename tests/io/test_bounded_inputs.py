"""Bounded memory for the inputs a user names: an .npz whose member inflates far past its stored size is refused
from the zip and .npy headers before any array is read; an image is bounded by the bytes its mode decodes to, and
its mode conversion works a block of rows at a time."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from customshift_jax.cli.main import main
from customshift_jax.io.images import ImageLimits, read_image
from customshift_jax.io.safe_files import read_npz

ROOT = Path(__file__).resolve().parents[2]


def _inflating_npz(path: Path, floats: int = 1 << 28) -> Path:
    """An .npz of a few MB whose prompt_embeds member inflates to `floats` x 4 bytes (1 GiB by default)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (floats,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("prompt_embeds.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(16 << 20)
            for _ in range(floats * 4 // len(zeros)):
                f.write(zeros)
        np.save(buf := io.BytesIO(), np.zeros((1, 24), np.float32))
        z.writestr("pooled_prompt_embeds.npy", buf.getvalue())
    return path


def test_an_inflating_embeds_npz_is_refused_before_reading(tmp_path, capsys, tiny_checkpoint_dir):
    """Case 13: a 4 MB --embeds .npz that inflates to 4 GB grew memory without bound; now one line, nothing read."""
    bomb = _inflating_npz(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 8 << 20
    out = tmp_path / "o"
    code = main(["generate", "--checkpoint", str(tiny_checkpoint_dir), "--embeds", str(bomb), "--height", "16",
                 "--width", "16", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert f"{bomb}: member prompt_embeds.npy inflates from" in lines[-1] and "refusing to read it" in lines[-1]
    with pytest.raises(ValueError, match="sample.embeds .* inflates from"):
        read_npz(bomb, "sample.embeds")


def test_npz_headers_that_promise_more_than_the_member_holds_are_refused(tmp_path):
    path = tmp_path / "short.npz"
    np.save(buf := io.BytesIO(), np.ones((4, 8), np.float32))
    member = buf.getvalue().replace(b"(4, 8)", b"(4, 9)")  # the .npy header says more than the member's bytes
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("prompt_embeds.npy", member)
    with pytest.raises(ValueError, match=r"header says \(4, 9\) float32 \(144 bytes\) but it holds"):
        read_npz(path, "--embeds")
    np.savez(path, names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        read_npz(path, "--embeds")
    with pytest.raises(ValueError, match="/dev/zero is a device, not a regular file"):
        read_npz("/dev/zero", "--embeds")


def _rgba_png(path: Path, side: int) -> Path:
    from PIL import Image

    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(path)
    return path


def test_an_image_is_bounded_by_the_bytes_its_mode_decodes_to(tmp_path):
    """Case 19: a 6300 x 6300 RGBA PNG of 180 KB (39.7 MP, under the 40 MP limit) took 4.2 GB: it decodes to
    159 MB, above the RGB-sized bound of 40 MP x 3 bytes, and is refused from its header."""
    big = _rgba_png(tmp_path / "big.png", 6300)
    assert big.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=r"is 6300x6300 RGBA: it decodes to 158760000 bytes, above the limit of "
                                         r"120000000 \(--max-image-pixels x 3\)"):
        read_image(big)
    assert read_image(big, ImageLimits(max_pixels=53_000_000)).size == (6300, 6300)  # raised: it reads


PEAK = """
import resource, sys
from customshift_jax.io.images import ImageLimits, read_image
import numpy, PIL.Image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = read_image(sys.argv[1])
assert image.mode == "RGB" and image.getpixel((0, 0)) == (132, 227, 142), image.getpixel((0, 0))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_converting_an_rgba_image_takes_a_few_times_its_decoded_size(tmp_path):
    """A 5400 x 5400 RGBA (117 MB decoded, within the bounds) is composited over white a block of rows at a time:
    about 0.4 GB at its peak, where float64 copies of the whole image took 3 GB."""
    png = _rgba_png(tmp_path / "rgba.png", 5400)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PEAK, str(png)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 600, f"peak {r.stdout.strip()} MB"
