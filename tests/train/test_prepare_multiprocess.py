"""`customshift prepare` at scale: two processes on 127.0.0.1 (4 CPU devices each, gloo; JAX text encoders and
the VAE on --mesh fsdp=4 of each process's devices) write the dataset that one process writes, records in the
manifest's order, bad records counted once; the shards stream (a stop for bad data keeps none and reads no
further); an interrupted run resumes at its first unfinished shard; one process on an 8-device mesh equals no
mesh."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from multiprocess_job import run_job

from customshift_jax.numerics import relative_error
from customshift_jax.train.data import BadDataWarning, ShardDataset, TooMuchBadData

TOL = 1e-5
FLAGS = ["--size", "16", "--batch-size", "2", "--shard-size", "3", "--max-sequence-length", "8",
         "--max-bad-fraction", "0.5", "--text-backend", "jax"]


def _png(path: Path, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return path.name


def write_manifest(tmp: Path, n: int, missing: tuple[int, ...] = ()) -> Path:
    """n records (record k's reference missing for k in `missing`) after one line that is not JSON."""
    lines = ["{not json"]
    for k in range(n):
        ref = f"gone{k}.png" if k in missing else _png(tmp / f"r{k}.png", 2 * k)
        lines.append(json.dumps({"reference": ref, "target": _png(tmp / f"t{k}.png", 2 * k + 1),
                                 "caption": f"a photo of the dog, take {k}", "subject": f"dog {k % 3}"}))
    path = tmp / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same_records(got: ShardDataset, want: ShardDataset) -> None:
    assert len(got) == len(want)
    for i in range(len(want)):
        a, b = got.get(i), want.get(i)
        assert set(a) == set(b)
        for k in b:
            assert relative_error(a[k], b[k]) <= TOL, (i, k)


def test_two_processes_write_what_one_process_writes(tmp_path, tiny_pipeline_dir):
    """Each process runs `customshift prepare ... --mesh fsdp=4 --distributed` on a JSONL manifest, on a
    Subjects200K folder, and on a manifest whose bad images (all in process 1's share) make it fail: process 1
    stops at the second and both processes stop alike, keeping nothing (one job: each call after the first joins
    the same jax.distributed client)."""
    from test_subjects200k import PAD, VIEW, write_dataset

    from customshift_jax.cli.main import main

    manifest = write_manifest(tmp_path, 8, missing=(6,))  # process 0 takes records 0-3, process 1 records 4-7
    (tmp_path / "bad").mkdir()
    s200k = write_dataset(tmp_path / "s200k")  # 9 rows: process 0 takes rows 0-3, process 1 rows 4-8
    common = ["--checkpoint", str(tiny_pipeline_dir), "--text-encoders", str(tiny_pipeline_dir), *FLAGS]
    runs = {"jsonl": ["prepare", str(manifest), "{out}", *common],
            "s200k": ["prepare", str(s200k), "{out}", "--format", "subjects200k", "--padding", str(PAD), *common,
                      "--size", str(VIEW)]}
    argv = lambda out: {k: [a.format(out=tmp_path / f"{k}-{out}") for a in v] for k, v in runs.items()}  # noqa: E731
    bad = write_manifest(tmp_path / "bad", 8, missing=(4, 5, 6))  # all in process 1's share
    job = [argv("two")["jsonl"], argv("two")["s200k"],
           ["prepare", str(bad), str(tmp_path / "bad-two"), *common, "--max-bad-fraction", "0.3"]]
    script = tmp_path / "job.py"  # each process: the three runs in turn, the third expected to stop (exit 2)
    script.write_text("import sys\nfrom customshift_jax.cli.main import main\n"
                      f"runs = [r + ['--mesh', 'fsdp=4', '--distributed'] for r in {job!r}]\n"
                      "sys.exit(main(runs[0]) or main(runs[1]) or int(main(runs[2]) != 2))\n")

    def one_process():  # while the job starts: the same data in this process, no mesh
        for run in argv("one").values():
            with pytest.warns(BadDataWarning):
                assert main(run) == 0

    logs, _, _ = run_job(tmp_path, one_process, n=2, argv=lambda i, n, port: [sys.executable, str(script)])
    one, index = ShardDataset(tmp_path / "jsonl-one"), json.loads((tmp_path / "jsonl-two" / "index.json").read_text())
    assert one.index["count"] == index["count"] == 7
    assert one.index["skipped_reasons"] == index["skipped_reasons"] == {"not_json": 1, "missing_image": 1}
    assert index["manifest_records"] == one.index["manifest_records"] == 9
    assert index["processes"] == [{"process": 0, "pairs": 4, "skipped": 0, "shards": 2},  # records 0-2, 3
                                  {"process": 1, "pairs": 3, "skipped": 1, "shards": 2}]  # records 4-6, 7
    assert [(s["dir"], s["count"]) for s in index["shards"]] == [
        ("shard-p00000-00000", 3), ("shard-p00000-00001", 1), ("shard-p00001-00000", 2), ("shard-p00001-00001", 1)]
    two = tmp_path / "jsonl-two"
    assert sorted(p.name for p in two.iterdir()) == [".prepare.json", "index.json", *(s["dir"] for s in index["shards"])]
    assert_same_records(ShardDataset(two), one)
    assert "[process 1 of 2] wrote" in logs[1] and "this process 3 pairs" in logs[1]

    one, two = ShardDataset(tmp_path / "s200k-one"), ShardDataset(tmp_path / "s200k-two")
    assert_same_records(two, one)
    for key in ("count", "filtered", "skipped_reasons", "manifest_records", "source_rows", "collections_seen"):
        assert two.index[key] == one.index[key], key
    assert two.index["count"] == 6 and two.index["filtered"] == {"quality": 3, "description_invalid": 1}
    assert [p["pairs"] for p in two.index["processes"]] == [4, 2]

    for log in logs:  # 1 line not JSON + process 1's 2 missing images, of 9 lines: above 30 %
        assert "error: manifest" in log and "3 of 9 records are unusable" in log
    assert not (tmp_path / "bad-two").exists()


def test_one_process_on_a_mesh_equals_no_mesh(tmp_path, tiny_pipeline_dir):
    from customshift_jax.parallel import sharding as shd
    from customshift_jax.train.prepare import prepare

    manifest = write_manifest(tmp_path, 5)
    kw = dict(checkpoint=tiny_pipeline_dir, text_encoders=tiny_pipeline_dir, size=16, batch_size=3, shard_size=4,
              max_sequence_length=8, max_bad_fraction=0.5, text_backend="auto", log=lambda *_: None)
    with pytest.warns(BadDataWarning):
        prepare(manifest, tmp_path / "plain", **kw)
        prepare(manifest, tmp_path / "mesh", mesh=shd.make_mesh(fsdp=4, tensor=2), rules="fsdp_tp", **kw)
    assert_same_records(ShardDataset(tmp_path / "mesh"), ShardDataset(tmp_path / "plain"))
    with pytest.raises(ValueError, match="--mesh shards the text encoders in JAX; use --text-backend jax"):
        prepare(manifest, tmp_path / "torch", mesh=shd.make_mesh(fsdp=8), **{**kw, "text_backend": "torch"})
    assert not (tmp_path / "torch").exists()


def test_bad_images_stop_the_stream_early_and_keep_no_shard(tmp_path, tiny_pipeline_dir, monkeypatch):
    """20 records, the last 14 missing, 30 % allowed: the stop comes at the bad image that makes the manifest
    fail (7 of its 21 lines), with the good pairs already written as shards; those shards are removed, and the
    records after the stop are not read."""
    from customshift_jax.train import data
    from customshift_jax.train.prepare import prepare

    manifest = write_manifest(tmp_path, 20, missing=tuple(range(6, 20)))
    read = []
    original = data.try_read_pair
    monkeypatch.setattr(data, "try_read_pair", lambda r, *a: read.append(r.line) or original(r, *a))
    out = tmp_path / "out"
    with pytest.warns(BadDataWarning), pytest.raises(TooMuchBadData, match=r"7 of 21 records are unusable already"):
        prepare(manifest, out, checkpoint=tiny_pipeline_dir, text_encoders=tiny_pipeline_dir, size=16, batch_size=2,
                shard_size=2, max_sequence_length=8, max_bad_fraction=0.3, read_threads=1, log=lambda *_: None)
    assert not out.exists()
    assert 12 <= len(read) <= 16  # up to the 6th missing image, and the few grain reads ahead; not all 20


def test_shards_stream_to_disk_a_batch_at_a_time(tmp_path):
    """Rows reach the shard's file as they are added (nothing held for the shard), the shard appears under its
    names only when whole, and a short last shard gets its true row count in place."""
    from customshift_jax.train.shard_writer import ShardWriter

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 3, 4)).astype(np.float32)
    writer = ShardWriter(tmp_path / "out", shard_size=4)
    writer.add({"latents": rows[:3]})
    folder = tmp_path / "out" / "shard-00000"
    [tmp] = list(folder.iterdir())  # the shard in progress: one temp file, not yet latents.npy
    assert tmp.name.startswith(".latents.npy.") and tmp.stat().st_size >= 3 * rows[0].nbytes
    writer.add({"latents": rows[3:]})
    writer.close({"size": 8})
    np.testing.assert_array_equal(np.load(folder / "latents.npy"), rows[:4])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "shard-00001" / "latents.npy"), rows[4:])
    assert sorted(p.name for p in folder.iterdir()) == ["latents.npy", "row-digests.bin"]  # with its checksums
    with pytest.raises(ValueError, match="shard arrays changed"):
        writer.add({"latents": rows[:1, :2]})


def test_progress_without_a_terminal_says_where_it_is_without_flooding(monkeypatch):
    """Without a bar: a line at the first batch (t = 5 s), none for batches within `every_s` of it, one at 35 s,
    one at the end."""
    from customshift_jax.train import prepare as prep

    now = [100.0]
    monkeypatch.setattr(prep.time, "time", lambda: now[0])
    said = []
    progress = prep.Progress(40, bar=False, log=said.append, every_s=30.0)
    for _ in range(10):  # a batch of 4 every 5 s
        now[0] += 5.0
        progress.update(4)
    progress.close()
    assert said == ["encoded 4/40 pairs (5s, 0.80 pairs/s)", "encoded 28/40 pairs (35s, 0.80 pairs/s)",
                    "encoded 40/40 pairs (50s, 0.80 pairs/s)"]


def test_an_interrupted_prepare_resumes_at_the_first_unfinished_shard(tmp_path, tiny_pipeline_dir, monkeypatch):
    """7 records in 4 blocks of 2 (one image missing in the first), interrupted while writing the third: the rerun
    keeps the two finished shards, encodes only the last two blocks, and writes what an uninterrupted run writes,
    counts included; the same leftovers with other settings are redone whole."""
    import itertools
    import shutil

    from customshift_jax.train import prepare as prep

    manifest = write_manifest(tmp_path, 7, missing=(1,))
    kw = dict(checkpoint=tiny_pipeline_dir, text_encoders=tiny_pipeline_dir, size=16, batch_size=2, shard_size=2,
              max_sequence_length=8, max_bad_fraction=0.5, read_threads=1)
    with pytest.warns(BadDataWarning):
        prep.prepare(manifest, tmp_path / "whole", log=lambda *_: None, **kw)
    original, calls = prep.encode_pairs, []

    def interrupted(pairs, writer, *a, **k):  # the third block: one pair into its shard, then Ctrl-C
        calls.append(writer.name)
        if len(calls) == 3:
            original(itertools.islice(pairs, 1), writer, *a, **k)
            raise KeyboardInterrupt
        return original(pairs, writer, *a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "encode_pairs", interrupted)
    with pytest.warns(BadDataWarning), pytest.raises(KeyboardInterrupt):
        prep.prepare(manifest, out, log=lambda *_: None, **kw)
    assert sorted(p.name for p in out.iterdir()) == [".prepare.json", ".progress-00000.json", "shard-00000",
                                                     "shard-00001"]  # the third's partial shard is gone
    shutil.copytree(out, tmp_path / "other")

    calls.clear()
    monkeypatch.setattr(prep, "encode_pairs", lambda *a, **k: calls.append(a[1].name) or original(*a, **k))
    said = []
    with warnings.catch_warnings():  # the first block's missing image is not read again
        warnings.simplefilter("ignore", BadDataWarning)  # the manifest's line that is not JSON: read again
        warnings.filterwarnings("error", "skipped: .*image not found", BadDataWarning)
        index = prep.prepare(manifest, out, log=said.append, **kw)
    assert calls == ["shard-00002", "shard-00003"]
    assert any("its 2 finished shard(s) are kept" in m for m in said)
    assert "resuming: 2 of 4 shard(s) already encoded (3 pairs)" in said
    whole = ShardDataset(tmp_path / "whole")
    for key in ("count", "shards", "skipped", "skipped_reasons", "manifest_records"):
        assert index[key] == whole.index[key], key
    assert_same_records(ShardDataset(out), whole)
    assert sorted(p.name for p in out.iterdir()) == [".prepare.json", "index.json", *(f"shard-0000{i}" for i in range(4))]

    calls.clear()  # other settings: nothing is kept
    with pytest.warns(BadDataWarning):
        prep.prepare(manifest, tmp_path / "other", log=said.append, **{**kw, "max_sequence_length": 12})
    assert calls == [f"shard-0000{i}" for i in range(4)]
    assert any("made with other settings or another process count" in m for m in said)
