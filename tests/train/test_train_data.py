"""Bad data (missing image, truncated image, non-JSON line): skipped with a counted warning, or a clear stop
above max_bad_fraction; the batch iterator is deterministic, per-process and resumable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import write_synthetic_dataset

from customshift_jax.train.config import load_config
from customshift_jax.train.data import (
    BadCounter,
    BadDataWarning,
    BatchIterator,
    ShardDataset,
    TooMuchBadData,
    read_manifest,
    read_pairs,
)

ROOT = Path(__file__).resolve().parents[2]


def _png(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


def _manifest(tmp: Path, n_good: int) -> tuple[Path, list[str]]:
    lines = []
    for i in range(n_good):
        _png(tmp / f"r{i}.png", 2 * i), _png(tmp / f"t{i}.png", 2 * i + 1)
        lines.append(json.dumps({"reference": f"r{i}.png", "target": f"t{i}.png", "caption": f"a photo {i}",
                                 "subject": "dog"}))
    return tmp / "m.jsonl", lines


def _bad_lines(tmp: Path) -> list[str]:
    data = (tmp / "t0.png").read_bytes()
    (tmp / "trunc.png").write_bytes(data[: len(data) // 2])
    return [json.dumps({"reference": "gone.png", "target": "t0.png", "caption": "c", "subject": "s"}),
            json.dumps({"reference": "r0.png", "target": "trunc.png", "caption": "c", "subject": "s"}),
            "{this is not json"]


def test_bad_records_are_skipped_and_counted(tmp_path):
    path, lines = _manifest(tmp_path, 60)
    path.write_text("\n".join(lines[:10] + _bad_lines(tmp_path) + lines[10:]) + "\n")
    counter = BadCounter()
    with pytest.warns(BadDataWarning) as rec:
        records = read_manifest(path, counter)
        pairs = list(read_pairs(records, 16, counter))
    assert counter.total == 63 and counter.bad == 3 and len(pairs) == 60
    assert counter.reasons == {"not_json": 1, "missing_image": 1, "bad_image": 1}
    assert len(rec) == 3
    counter.check(0.05, "m.jsonl")  # 3/63 < 5 %: no stop
    ref, tgt = pairs[0][1], pairs[0][2]
    assert ref.shape == tgt.shape == (3, 16, 16) and -1 <= ref.min() and ref.max() <= 1


def test_too_much_bad_data_stops_clearly(tmp_path):
    path, lines = _manifest(tmp_path, 10)
    path.write_text("\n".join(lines + _bad_lines(tmp_path)) + "\n")
    counter = BadCounter()
    with pytest.warns(BadDataWarning):
        list(read_pairs(read_manifest(path, counter), 16, counter))
    with pytest.raises(TooMuchBadData, match=r"3 of 13 records are unusable.*--max-bad-fraction"):
        counter.check(0.05, "m.jsonl")


def test_missing_manifest_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest .* does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="bad override 'steps'"):
        load_config(None, ["steps"])
    with pytest.raises(ValueError, match="unknown config key train.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="missing config key output_dir"):
        load_config(None, ["data.path=x", "model.preset=tiny-sd3-medium"])
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        ShardDataset(tmp_path)


def test_config_types_and_conflicts_name_the_key():
    """A wrong type names the key; the checkpoint and a preset conflict; the saved config is what runs."""
    req = ["output_dir=o", "data.path=d"]
    with pytest.raises(ValueError, match=r"config key train.steps='five': expected int"):
        load_config(None, [*req, "model.preset=tiny-sd3-medium", "train.steps=five"])
    with pytest.raises(ValueError, match=r"config key log.tensorboard=1: expected bool"):
        load_config(None, [*req, "model.preset=tiny-sd3-medium", "log.tensorboard=1"])
    cfg = load_config(None, [*req, "model.preset=tiny-sd3-medium", "train.lr=1e-4", "sample.reference=ref.png"])
    assert cfg["train"]["lr"] == 1e-4 and cfg["sample"]["reference"] == "ref.png"  # 1e-4: YAML 1.1 gives a str
    with pytest.raises(ValueError, match=r"model.checkpoint=ck and model.preset=tiny-sd3-medium are both set"):
        load_config(ROOT / "train" / "configs" / "tiny.yaml", [*req, "model.checkpoint=ck"])
    cfg = load_config(ROOT / "train" / "configs" / "tiny.yaml", [*req, "model.checkpoint=ck", "model.preset=null"])
    assert cfg["model"]["num_layers"] is None  # tiny.yaml's num_layers: 2 only applies to a preset
    # tiny.yaml shows a progress bar on a terminal (and none in a log file) unless told otherwise
    from customshift_jax.train.loop import show_progress

    assert cfg["log"]["progress"] == "auto" and show_progress("auto", True) and not show_progress("auto", False)
    with pytest.raises(ValueError, match="log.progress='sometimes'"):
        load_config(None, [*req, "model.preset=tiny-sd3-medium", "log.progress=sometimes"])


def test_iterator_deterministic_sharded_resumable(tmp_path):
    ds = ShardDataset(write_synthetic_dataset(tmp_path / "d", n=7, shard_size=3))
    assert len(ds) == 7 and ds.flip
    a = BatchIterator(ds, 2, seed=3, process_index=0, process_count=1)
    batches = [next(a) for _ in range(7)]  # two epochs of 7 records; batches run across the epoch end
    pooled = [ds.get(i)["pooled"] for i in range(7)]
    seen = [next(i for i in range(7) if np.array_equal(row, pooled[i])) for b in batches for row in b["pooled"]]
    assert sorted(seen[:7]) == sorted(seen[7:]) == list(range(7)) and seen[:7] != seen[7:]  # reshuffled
    b = BatchIterator(ds, 2, seed=3, process_index=0, process_count=1)
    for _ in range(4):
        next(b)
    c = BatchIterator(ds, 2, seed=3, process_index=0, process_count=1)
    c.restore(json.loads(json.dumps(b.state())))
    for want in batches[4:]:
        got = next(c)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # Two processes split each global batch into their halves.
    p0 = next(BatchIterator(ds, 2, seed=3, process_index=0, process_count=2))
    p1 = next(BatchIterator(ds, 2, seed=3, process_index=1, process_count=2))
    np.testing.assert_array_equal(np.concatenate([p0["pooled"], p1["pooled"]]), batches[0]["pooled"])
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, 2, seed=4, process_index=0, process_count=1).restore(b.state())
    # The same flip for target and reference: all flipped with flip_prob 1, none with 0.
    for prob in (0.0, 1.0):
        got = next(BatchIterator(ds, 7, seed=0, shuffle=False, flip_prob=prob, process_index=0, process_count=1))
        want = [ds.get(i, flip=bool(prob)) for i in range(7)]
        for k in ("latents", "ref_latents"):
            np.testing.assert_array_equal(got[k], np.stack([w[k] for w in want]))


def test_tensorboard_events_roundtrip(tmp_path):
    from customshift_jax.train.metrics import MetricsLogger, read_events

    m = MetricsLogger(tmp_path)
    m.log(1, {"loss": 0.5, "lr": 1e-4})
    m.log(2, {"loss": 0.25})
    m.close()
    (ev,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    got = read_events(ev)
    assert [s for s, _ in got] == [1, 2] and got[0][1]["loss"] == 0.5 and got[1][1]["loss"] == 0.25


def test_prepare_skips_bad_records_and_writes_shards(tmp_path, tiny_pipeline_dir):
    from customshift_jax.train.prepare import prepare

    path, lines = _manifest(tmp_path, 5)
    path.write_text("\n".join(lines[:2] + _bad_lines(tmp_path) + lines[2:]) + "\n")
    with pytest.warns(BadDataWarning):
        index = prepare(path, tmp_path / "out", checkpoint=tiny_pipeline_dir, text_encoders=tiny_pipeline_dir,
                        size=16, batch_size=2, shard_size=3, max_sequence_length=8, max_bad_fraction=0.5,
                        read_threads=3, log=lambda *_: None)
    assert index["count"] == 5 and index["skipped"] == 3 and index["manifest_records"] == 8
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == 5 and ds.flip and ds.get(4)["latents"].shape == (16, 8, 8)
    with pytest.warns(BadDataWarning), pytest.raises(TooMuchBadData, match="2 of 8 records are unusable already"):  # 2 > 20 % of 8
        prepare(path, tmp_path / "out2", checkpoint=tiny_pipeline_dir, text_encoders=tiny_pipeline_dir, size=16,
                max_bad_fraction=0.2, log=lambda *_: None)
    assert not (tmp_path / "out2").exists()  # a stop for bad data keeps nothing: no shard, no marker, no OUT
