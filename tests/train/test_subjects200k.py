"""`prepare --format subjects200k` on a small synthetic parquet in Subjects200K's schema: each composite's two
views land as reference and target with the right captions and subject names, filtered rows are counted by reason,
unusable rows are bad records named by file and row, each process reads its share, a missing column is refused."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from customshift_jax.train.data import BadCounter, BadDataWarning, ShardDataset
from customshift_jax.train.subjects200k import Subjects200KOptions, Subjects200KSource

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

VIEW, PAD = 16, 2  # the real shards: 512-px views, 8 px padding, 1056 x 528 composites
QUALITY = pa.struct([(k, pa.int64()) for k in ("compositeStructure", "objectConsistency", "imageQuality")])
DESCRIPTION = pa.struct([("item", pa.string()), ("description_0", pa.string()), ("description_1", pa.string()),
                         ("category", pa.string()), ("description_valid", pa.bool_())])
SCHEMA = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    ("collection", pa.string()), ("quality_assessment", QUALITY), ("description", DESCRIPTION)])


def views(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct (VIEW, VIEW, 3) uint8 patterns: a per-row colour plus a ramp, so any shift or swap shows."""
    rng = np.random.default_rng(seed)
    ramp = np.arange(VIEW, dtype=np.uint8)[None, :, None] * 4 + np.arange(VIEW, dtype=np.uint8)[:, None, None]
    left = (rng.integers(0, 120, 3, dtype=np.uint8) + ramp).astype(np.uint8)
    right = (rng.integers(120, 190, 3, dtype=np.uint8) + ramp[:, ::-1]).astype(np.uint8)
    return left, right


def composite(left: np.ndarray, right: np.ndarray) -> bytes:
    """The views side by side as Subjects200K lays them out: width 2v + 4p, height v + 2p, a grey border."""
    from PIL import Image

    img = np.full((VIEW + 2 * PAD, 2 * VIEW + 4 * PAD, 3), 250, np.uint8)
    img[PAD:PAD + VIEW, PAD:PAD + VIEW] = left
    img[PAD:PAD + VIEW, VIEW + 2 * PAD:2 * VIEW + 2 * PAD] = right
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def row(i: int, collection: str = "collection_2", quality=(5, 5, 5), valid: bool = True, image: bytes | None = None):
    return {"image": {"bytes": composite(*views(i)) if image is None else image, "path": f"{i}.png"},
            "collection": collection,
            "quality_assessment": None if quality is None else dict(zip(QUALITY.names, quality)),
            "description": {"item": f"item {i}", "description_0": f"left scene {i}", "description_1": f"right scene {i}",
                            "category": "toys", "description_valid": valid}}


def square_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(folder: Path) -> Path:
    """Two shards (row groups of 2 rows) of 9 rows: 3 kept, 4 filtered, 2 unusable."""
    rows = [row(0), row(1, quality=(5, 4, 5)), row(2, collection="collection_1"), row(3, valid=False),
            row(4, image=b"not an image"),  # bad: does not decode
            row(5, quality=None), row(6), row(7, image=square_png()),  # 5: no scores (filtered); 7: no two views
            row(8, quality=(3, 5, 5))]
    (folder / "data").mkdir(parents=True)
    for k, part in enumerate((rows[:5], rows[5:])):
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), folder / "data" / f"train-{k:05d}-of-00002.parquet",
                       row_group_size=2)
    return folder


KEPT = (0, 2, 6)  # the rows that pass the default filters and decode


def expected_pixels(i: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple((v.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1) for v in views(i))


def read_all(folder: Path, options: Subjects200KOptions | None = None, pi: int = 0, pc: int = 1):
    options = options or Subjects200KOptions(padding=PAD)
    source = Subjects200KSource(folder, options, process_index=pi, process_count=pc, batch_rows=3, log=lambda _: None)
    counter = BadCounter()
    return source, counter, list(source.pairs(VIEW, counter, threads=2))


def test_views_captions_subjects_filters_and_bad_rows(tmp_path):
    folder = write_dataset(tmp_path / "s200k")
    with pytest.warns(BadDataWarning) as warned:
        source, counter, pairs = read_all(folder)
    assert source.total_rows == 9 and source.filtered == {"quality": 3, "description_invalid": 1}
    assert counter.total == 5 and counter.reasons == {"bad_image": 2}
    messages = [str(w.message) for w in warned]
    assert any("train-00000-of-00002.parquet row 4" in m for m in messages)
    assert any("train-00001-of-00002.parquet row 2" in m and "cannot hold two 16x16 views" in m for m in messages)
    # Both directions: (left -> right, description_1), then (right -> left, description_0), in row order.
    assert [(p[0].caption, p[0].subject) for p in pairs] == [
        (f"{s} scene {i}", f"item {i}") for i in KEPT for s in ("right", "left")]
    for k, i in enumerate(KEPT):
        left, right = expected_pixels(i)
        np.testing.assert_array_equal(pairs[2 * k][1], left)  # reference: the left view, every pixel
        np.testing.assert_array_equal(pairs[2 * k][2], right)
        np.testing.assert_array_equal(pairs[2 * k + 1][1], right)
        np.testing.assert_array_equal(pairs[2 * k + 1][2], left)
    # One direction, one collection, no quality filter, invalid descriptions kept.
    opts = Subjects200KOptions(min_quality=0, collections=("collection_2",), keep_invalid_descriptions=True,
                               directions="left-to-right", padding=PAD)
    with pytest.warns(BadDataWarning):
        source, counter, pairs = read_all(folder, opts)
    assert source.filtered == {"collection": 1} and counter.reasons == {"bad_image": 2}
    assert [p[0].subject for p in pairs] == [f"item {i}" for i in (0, 1, 3, 5, 6, 8)]
    assert all(p[0].caption.startswith("right scene") for p in pairs)
    assert source.meta()["filters"]["collections"] == ["collection_2"]


def test_each_process_reads_its_share(tmp_path):
    folder = write_dataset(tmp_path / "s200k")
    opts = Subjects200KOptions(min_quality=0, keep_invalid_descriptions=True, directions="left-to-right", padding=PAD)
    with pytest.warns(BadDataWarning):
        whole = [p[0].reference for p in read_all(folder, opts)[2]]
    assert len(whole) == 7  # 9 rows, 2 unusable
    for pc in (2, 4):
        shares = []
        for pi in range(pc):
            with warnings.catch_warnings():  # a share may or may not hold the unusable rows
                warnings.simplefilter("ignore", BadDataWarning)
                source, _, pairs = read_all(folder, opts, pi, pc)
            assert source.rows == (pi * 9 // pc, (pi + 1) * 9 // pc)
            shares.append([p[0].reference for p in pairs])
        assert [r for share in shares for r in share] == whole  # disjoint, complete, in order


def test_missing_column_or_field_is_refused_by_name(tmp_path, capsys):
    from customshift_jax.cli.main import main

    folder = tmp_path / "s200k"
    folder.mkdir()
    rows = [row(0)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["quality_assessment"])
    pq.write_table(table, folder / "train-0.parquet")
    with pytest.raises(ValueError, match=r"train-0.parquet: no column 'quality_assessment' \(or pass --min-quality 0\)"):
        Subjects200KSource(folder, process_index=0, process_count=1)
    Subjects200KSource(folder, Subjects200KOptions(min_quality=0), process_index=0, process_count=1)  # not needed
    # Through the CLI: refused before any model loads (the checkpoint does not even exist), exit 2, one line.
    argv = ["prepare", str(folder), str(tmp_path / "out"), "--format", "subjects200k", "--checkpoint", "nope",
            "--text-encoders", "nope"]
    assert main(argv) == 2
    assert "no column 'quality_assessment'" in capsys.readouterr().err
    no_desc1 = pa.struct([f for f in DESCRIPTION if f.name != "description_1"])
    table = pa.Table.from_pylist([{**row(0), "description": {"item": "x"}}],
                                 schema=SCHEMA.set(3, pa.field("description", no_desc1)))
    pq.write_table(table, folder / "train-0.parquet")
    with pytest.raises(ValueError, match="column 'description' has no field 'description_1'"):
        Subjects200KSource(folder, process_index=0, process_count=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        Subjects200KSource(tmp_path / "empty", process_index=0, process_count=1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    assert main(["prepare", str(manifest), str(tmp_path / "o2"), "--checkpoint", "x", "--text-encoders", "x",
                 "--collections", "collection_2"]) == 2
    assert "--collections apply to --format subjects200k only" in capsys.readouterr().err


def test_prepare_subjects200k_end_to_end(tmp_path, tiny_pipeline_dir):
    """The CLI writes shards whose latents are the VAE's of the expected views and whose embeddings are the
    encoders' of the expected captions and subject names; the index counts filtered and skipped rows."""
    import jax

    from customshift_jax.cli.main import main
    from customshift_jax.io.loading import load_vae
    from customshift_jax.models.vae import scale_latents, vae_encode
    from customshift_jax.text import TextEncoders

    folder = write_dataset(tmp_path / "s200k")
    out = tmp_path / "out"
    argv = ["prepare", str(folder), str(out), "--format", "subjects200k", "--checkpoint", str(tiny_pipeline_dir),
            "--text-encoders", str(tiny_pipeline_dir), "--size", str(VIEW), "--padding", str(PAD), "--batch-size", "4", "--shard-size", "4",
            "--max-sequence-length", "8", "--max-bad-fraction", "0.5", "--read-threads", "2"]
    with pytest.warns(BadDataWarning):
        assert main(argv) == 0
    ds = ShardDataset(out)
    index = ds.index
    assert len(ds) == 6 and [s["count"] for s in index["shards"]] == [4, 2]
    assert index["format"] == "subjects200k" and index["filtered"] == {"quality": 3, "description_invalid": 1}
    assert index["skipped_reasons"] == {"bad_image": 2} and index["manifest_records"] == 5
    refs, tgts, captions, subjects = [], [], [], []
    for i in KEPT:
        left, right = expected_pixels(i)
        refs += [left, right]
        tgts += [right, left]
        captions += [f"right scene {i}", f"left scene {i}"]
        subjects += [f"item {i}"] * 2
    config, params = load_vae(tiny_pipeline_dir)
    encode = jax.jit(lambda x: scale_latents(config, vae_encode(config, params, x)))
    want_tgt, want_ref = np.asarray(encode(np.stack(tgts))), np.asarray(encode(np.stack(refs)))
    want_tgt_flip = np.asarray(encode(np.stack(tgts)[..., ::-1]))
    encoders = TextEncoders.from_pretrained(tiny_pipeline_dir)
    emb, pooled = encoders.encode_batch(captions, max_sequence_length=8)
    s_emb, s_pooled = encoders.encode_batch(subjects, max_sequence_length=8)
    got = [ds.get(k) for k in range(6)]
    stack = lambda key: np.stack([g[key] for g in got])
    np.testing.assert_allclose(stack("latents"), want_tgt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stack("ref_latents"), want_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack([ds.get(k, flip=True)["latents"] for k in range(6)]), want_tgt_flip,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(want_tgt - want_ref).max() > 0.1  # reference and target differ: a swap would show
    np.testing.assert_allclose(stack("prompt_embeds"), emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stack("pooled"), pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stack("subject_embeds"), s_emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stack("subject_pooled"), s_pooled, rtol=1e-5, atol=1e-5)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3 and np.abs(s_emb[0] - s_emb[2]).max() > 1e-3  # texts differ
