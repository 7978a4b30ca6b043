"""Bounded, correct input and no writes through links (issue 15): images only from regular files within byte and
pixel limits, every PIL mode to RGB correctly, manifests' repeats and non-UTF-8 lines counted, prepare's OUT
checked, and every file the CLI writes refusing a planted symlink."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from customshift_jax.io.images import ImageLimits, decode_image, load_reference_image, read_image, to_rgb
from customshift_jax.io.safe_files import atomic_write, make_dir, open_append, write_text
from customshift_jax.train.data import BadCounter, BadDataWarning, ShardWriter, read_manifest, read_pairs
from customshift_jax.train.prepare import check_destination

RGB = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
GRAY = RGB[..., 0]


# ---------------------------------------------------------------------------------------------- modes
def _rgb(img) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out).astype(int)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_is_scaled_not_clipped_to_white(mode):
    """A 16-bit sample v means v / 65535 of full scale: 257 * g reads back as g (PIL's convert gave 255)."""
    wide = GRAY.astype(np.uint32) * 257
    if mode == "I":  # 32-bit integers holding the same 16-bit samples
        img = Image.fromarray(wide.astype(np.int32))
    else:
        img = Image.frombytes(mode, (7, 6), wide.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert img.mode == mode
    np.testing.assert_array_equal(_rgb(img), np.repeat(GRAY[..., None], 3, -1))


def test_float_samples_span_zero_to_one():
    img = Image.fromarray((GRAY / 255.0).astype(np.float32), mode="F")
    np.testing.assert_array_equal(_rgb(img), np.repeat(GRAY[..., None], 3, -1))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa"])
def test_transparency_is_composited_over_white(mode):
    alpha = np.linspace(0, 255, 42).round().astype(np.uint8).reshape(6, 7)
    rgba = Image.fromarray(np.dstack([RGB, alpha]), "RGBA")
    img = rgba.convert(mode) if mode != "PA" else rgba.convert("RGBA").convert("PA")
    back = np.asarray(img.convert("RGBA"), float)  # the colours the mode holds, un-premultiplied
    expect = back[..., :3] * back[..., 3:] / 255 + 255 * (1 - back[..., 3:] / 255)
    np.testing.assert_allclose(_rgb(img), expect, atol=0.5)
    assert _rgb(img)[0, 0].tolist() == [255, 255, 255]  # alpha 0: white, not the hidden colour (black before)


def test_palette_with_a_transparent_entry_is_white_there():
    img = Image.fromarray(RGB).quantize(16)
    img.info["transparency"] = int(np.asarray(img)[0, 0])
    got = _rgb(img)
    assert got[0, 0].tolist() == [255, 255, 255]
    opaque = np.asarray(img) != img.info["transparency"]
    np.testing.assert_array_equal(got[opaque], np.asarray(img.convert("RGB")).astype(int)[opaque])


# YCbCr's 8-bit chroma rounding moves a colour by at most 3 levels. (LAB goes through PIL's own conversion too; its
# 8-bit round trip alone loses up to 17 levels, so the source colours are no reference for it.)
@pytest.mark.parametrize("mode,atol", [("L", 0), ("1", 0), ("P", 0), ("CMYK", 0), ("RGBX", 0), ("YCbCr", 3)])
def test_opaque_modes_keep_their_colours(mode, atol):
    """Against the source colours: exact for lossless modes, within the colour space's rounding otherwise."""
    if mode in ("L", "1"):
        src = np.repeat(((GRAY > 127) * 255 if mode == "1" else GRAY)[..., None], 3, -1).astype(np.uint8)
    else:
        src = RGB
    img = Image.fromarray(src).convert(mode) if mode != "P" else Image.fromarray(src).quantize(256)
    expect = np.asarray(img.convert("RGB")).astype(int) if mode == "P" else src.astype(int)
    assert np.abs(_rgb(img) - expect).max() <= atol


def test_hsv_is_converted_by_the_hsv_formula():
    """HSV against an independent conversion of the image's own H, S, V bytes (colorsys), to the nearest level;
    the source colours are no reference here: 256 hue steps alone move a saturated colour by up to 6 levels."""
    import colorsys

    img = Image.fromarray(RGB).convert("HSV")
    hsv = np.asarray(img).astype(float) / 255
    expect = np.array([[colorsys.hsv_to_rgb(*px) for px in row] for row in hsv]) * 255
    assert np.abs(_rgb(img) - expect).max() <= 0.5


# ---------------------------------------------------------------------------------------------- bounded reads
def test_fifo_and_device_are_refused_without_reading(tmp_path):
    """A FIFO or /dev/zero named as an image is refused from its file type: nothing is read (it would block or
    fill memory); in a manifest it is a counted bad record naming the manifest line."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), ("/dev/zero", "device")):
        with pytest.raises(ValueError, match=f"is a {kind}, not a regular file"):
            read_image(path)
    good = tmp_path / "ok.png"
    Image.fromarray(RGB).save(good)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"reference": str(r), "target": str(good), "caption": "c",
                                              "subject": "s"}) for r in (fifo, "/dev/zero", good)) + "\n")
    counter = BadCounter()
    with pytest.warns(BadDataWarning):
        pairs = list(read_pairs(read_manifest(manifest, counter), 8, counter, threads=1))
    assert len(pairs) == 1 and counter.reasons == {"bad_image": 2}
    assert all(str(manifest) in m for m in counter.examples), counter.examples  # the file, not just a line
    with pytest.raises(ValueError, match="manifest /dev/zero is a device"):
        read_manifest("/dev/zero")


def test_byte_and_pixel_limits_are_named_and_checked_before_decoding(tmp_path):
    """A 10000 x 10000 PNG (a few KB on disk, 300 MB decoded) is refused from its header; both limits are
    configurable and named by their flags; a 1 x 4000 strip has no square to crop."""
    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big)
    assert big.stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"10000x10000 = 100000000 pixels.*--max-image-pixels"):
        read_image(big)
    small = tmp_path / "small.png"
    Image.fromarray(RGB).save(small)
    with pytest.raises(ValueError, match=r"more than 100 bytes.*--max-image-bytes"):
        read_image(small, ImageLimits(max_bytes=100))
    with pytest.raises(ValueError, match="--max-image-pixels"):
        read_image(small, ImageLimits(max_pixels=41))
    assert read_image(small, ImageLimits(max_pixels=42)).size == (7, 6)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4000, 1)).save(strip)
    with pytest.raises(ValueError, match="4000x1: its sides differ"):
        read_image(strip)
    with pytest.raises(ValueError, match="reference image .*--max-image-pixels"):
        load_reference_image(big, 16, 16)


def test_sixteen_bit_reference_png_is_not_white(tmp_path):
    """The row seen: a 16-bit grayscale PNG as --reference became a uniform white image."""
    path = tmp_path / "g16.png"
    Image.fromarray(np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (16, 1))).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = load_reference_image(path, 16, 16)
    assert pixels.min() < -0.9 and pixels.max() > 0.8  # a ramp from black to white, not a white frame


def test_decode_refuses_what_is_not_an_image():
    with pytest.raises(ValueError, match="x.png cannot be read as an image"):
        decode_image(b"not a png", "x.png")


# ---------------------------------------------------------------------------------------------- manifests
def test_repeated_and_non_utf8_lines_are_counted_warnings(tmp_path):
    """A repeated line is dropped and counted; a line that is not UTF-8 keeps its path's bytes (so the file is
    found: "not found" before) and gets U+FFFD in its text; neither counts as bad data."""
    name = "caf\xe9".encode("latin-1")  # b"caf\xe9": not UTF-8
    img = tmp_path / os.fsdecode(name + b".png")
    Image.fromarray(RGB).save(img)
    good = tmp_path / "t.png"
    Image.fromarray(RGB).save(good)
    line = json.dumps({"reference": "t.png", "target": "t.png", "caption": "a dog", "subject": "dog"}).encode()
    raw = b'{"reference": "' + name + b'.png", "target": "t.png", "caption": "un ' + name + b'", "subject": "x"}'
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([line, raw, line, line]) + b"\n")
    counter = BadCounter()
    with pytest.warns(BadDataWarning) as said:
        records = read_manifest(tmp_path / "m.jsonl", counter)
    said = [str(w.message) for w in said]
    assert any("m.jsonl:2 is not UTF-8" in m for m in said) and any("m.jsonl:3 repeats line 1" in m for m in said)
    assert len(records) == 2 and counter.bad == 0
    assert counter.warned == {"not_utf8": 1, "duplicate": 2}
    assert Path(records[1].reference).exists() and records[1].caption == "un caf\ufffd"
    assert len(list(read_pairs(records, 8, counter, threads=1))) == 2
    assert "warnings {'not_utf8': 1, 'duplicate': 2}" in counter.summary()


def test_prepare_out_must_be_new_empty_or_an_unfinished_prepare_of_the_same_manifest(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    out = tmp_path / "out"
    check_destination(out, manifest)  # new: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shard-00000").mkdir()
    with pytest.raises(ValueError, match="is not empty .* holds notes.txt"):
        check_destination(out, manifest)
    (out / "notes.txt").unlink()
    (out / ".prepare.json").write_text(json.dumps({"manifest": str(tmp_path / "other.jsonl")}))
    with pytest.raises(ValueError, match="not an unfinished prepare of"):
        check_destination(out, manifest)
    (out / ".prepare.json").write_text(json.dumps({"manifest": str(manifest.absolute())}))
    said = []
    check_destination(out, manifest, said.append)  # the same manifest, interrupted: its shards are redone
    assert not (out / "shard-00000").exists() and "redone" in said[0]
    (out / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        check_destination(out, manifest)
    link = tmp_path / "link-out"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        check_destination(link, manifest)


# ---------------------------------------------------------------------------------------------- links
def _planted(tmp_path: Path, at: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    at.symlink_to(victim)
    return victim


def test_writes_refuse_a_planted_link_and_leave_its_target(tmp_path):
    folder = make_dir(tmp_path / "out")
    for write in (lambda p: write_text(p, "x"), lambda p: atomic_write(p).__enter__(), lambda p: open_append(p)):
        at = folder / "file"
        victim = _planted(tmp_path, at)
        with pytest.raises(ValueError, match="symbolic link"):
            write(at)
        assert victim.read_text() == "precious"
        at.unlink()
    assert sorted(p.name for p in folder.iterdir()) == []  # no temp file left behind
    (tmp_path / "d").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        make_dir(tmp_path / "d")


def test_prepare_shards_and_index_refuse_planted_links(tmp_path):
    """The rows seen: a link planted as a shard folder or as the index was written through, out of OUT."""
    out = tmp_path / "out"
    writer = ShardWriter(out, shard_size=1)
    (out / "shard-00000").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="shard folder .* symbolic link"):
        writer.add({"latents": np.zeros((1, 2), np.float32)})
    (out / "shard-00000").unlink()
    writer = ShardWriter(out, shard_size=4)
    writer.add({"latents": np.zeros((1, 2), np.float32)})
    victim = _planted(tmp_path, out / "index.json")
    with pytest.raises(ValueError, match="dataset index .* symbolic link"):
        writer.close({})
    assert victim.read_text() == "precious"


def test_metrics_and_run_config_refuse_planted_links(tmp_path):
    from customshift_jax.train.metrics import MetricsLogger

    victim = _planted(tmp_path, tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match="metrics path .* symbolic link"):
        MetricsLogger(tmp_path, tensorboard=False)
    assert victim.read_text() == "precious"


def test_exclusive_temp_files_never_collide(tmp_path):
    """Two writers of one path at once: each has its own exclusive temp file; the result is one of them, whole."""
    path = tmp_path / "f.txt"
    texts = ["a" * 100_000, "b" * 100_000]
    threads = [threading.Thread(target=write_text, args=(path, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text() in texts and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
