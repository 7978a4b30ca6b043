"""Prepared data is checked when read: each shard's arrays present (one line naming the shard and the file), each
record's rows against the checksums written with them (index.json -> row-digests.bin); and a prepared dataset
records the content of the VAE and text encoders that made it, so a resume after they changed redoes the work."""
from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_prepare_multiprocess import write_manifest
from train_fixtures import ROOT, write_synthetic_dataset

from customshift_jax.cli.main import main
from customshift_jax.train.data import BadDataWarning, ShardDataset
from customshift_jax.train.shard_digests import DIGESTS_NAME, DamagedShard

TINY = ROOT / "train" / "configs" / "tiny.yaml"


def _train_error(capsys, data: Path, out: Path, *extra: str) -> str:
    code = main(["train", "--config", str(TINY), f"data.path={data}", f"output_dir={out}", "log.progress=false",
                 "log.tensorboard=false", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_shard_missing_an_array_is_one_line_naming_shard_and_file(capsys, tmp_path):
    """Case 14: a shard without prompt_embeds.npy was a grain IndexError traceback."""
    data = write_synthetic_dataset(tmp_path / "data")
    (data / "shard-00001" / "prompt_embeds.npy").unlink()
    line = _train_error(capsys, data, tmp_path / "run")
    assert f"{data / 'shard-00001'}: prompt_embeds.npy is missing" in line, line


def test_altered_latents_stop_training_naming_the_file_and_row(capsys, tmp_path):
    """Case 8: a prepared shard's latents altered: training ran and exported another LoRA, exit 0. Now the first
    read of the altered record stops the run (exit 2), naming the file and the row."""
    data = write_synthetic_dataset(tmp_path / "data")
    for name in ("latents", "latents_flip"):  # whichever the flip draws
        a = np.load(data / "shard-00000" / f"{name}.npy", mmap_mode="r+")
        a[1, 0, 0, 0] += 0.5
        a.flush()
        del a
    line = _train_error(capsys, data, tmp_path / "run", "train.steps=8")
    assert "shard-00000/latents" in line and "row 1 does not match its checksum" in line, line
    assert not (tmp_path / "run" / "lora").exists()


def test_checksums_cover_every_array_and_their_own_file(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data")
    index = json.loads((data / "index.json").read_text())
    for shard in index["shards"]:
        assert shard["digests"].startswith("sha256:") and "prompt_embeds" in shard["arrays"]
    ds = ShardDataset(data)
    for i in range(len(ds)):  # an intact dataset reads whole, flipped or not
        ds.get(i), ds.get(i, flip=True)
    a = np.load(data / "shard-00001" / "subject_pooled.npy", mmap_mode="r+")
    a[0, 3] = np.float32(7.0)
    a.flush()
    del a
    with pytest.raises(DamagedShard, match=r"subject_pooled.npy: row 0 does not match its checksum"):
        ShardDataset(data).get(3)
    digests = data / "shard-00000" / DIGESTS_NAME
    digests.write_bytes(digests.read_bytes()[::-1])  # the checksums themselves altered
    with pytest.raises(DamagedShard, match=rf"{DIGESTS_NAME} does not match its checksum in index.json"):
        ShardDataset(data)


def test_resume_with_another_vae_at_the_same_path_redoes_the_shards(capsys, tmp_path, monkeypatch,
                                                                    tiny_pipeline_dir):
    """Case 11: prepare killed after some shards, the VAE checkpoint replaced at the same path, the same command
    rerun: "N finished shard(s) kept", shards of two VAEs mixed. The VAE's content is now in the fingerprint."""
    from safetensors.numpy import load_file, save_file

    from customshift_jax.train import prepare as prep

    manifest = write_manifest(tmp_path, 6)
    vae_ck = tmp_path / "vae-ck"
    shutil.copytree(tiny_pipeline_dir, vae_ck)
    argv = ["prepare", str(manifest), str(tmp_path / "out"), "--checkpoint", str(vae_ck), "--text-encoders",
            str(tiny_pipeline_dir), "--size", "16", "--batch-size", "2", "--shard-size", "2",
            "--max-sequence-length", "8", "--max-bad-fraction", "0.5", "--read-threads", "1", "--no-progress"]
    original, calls = prep.encode_pairs, []

    def interrupted(pairs, writer, *a, **k):  # Ctrl-C in the second block
        calls.append(writer.name)
        if len(calls) == 2:
            original(itertools.islice(pairs, 1), writer, *a, **k)
            raise KeyboardInterrupt
        return original(pairs, writer, *a, **k)

    monkeypatch.setattr(prep, "encode_pairs", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        assert main(argv) == 130
        weights = next((vae_ck / "vae").glob("*.safetensors"))
        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] * 1.5  # another VAE, same path, same shapes
        save_file(tensors, str(weights))
        calls.clear()
        monkeypatch.setattr(prep, "encode_pairs", lambda *a, **k: calls.append(a[1].name) or original(*a, **k))
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert calls == ["shard-00000", "shard-00001", "shard-00002"], calls  # nothing kept from the other VAE
    assert "made with other settings" in out and "finished shard(s) are kept" not in out, out
    made_by = ShardDataset(tmp_path / "out").index["made_by"]
    assert made_by["vae"].startswith("sha256:") and made_by["text_encoders"].startswith("sha256:")


def test_prepare_names_the_records_it_skipped(capsys, tmp_path, tiny_pipeline_dir):
    """README says skipped records are named; the summary line (and the index) now name them by file and line."""
    manifest = write_manifest(tmp_path, 4, missing=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        assert main(["prepare", str(manifest), str(tmp_path / "out"), "--checkpoint", str(tiny_pipeline_dir),
                     "--text-encoders", str(tiny_pipeline_dir), "--size", "16", "--batch-size", "2",
                     "--max-sequence-length", "8", "--max-bad-fraction", "0.5", "--no-progress"]) == 0
    [summary] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert "3 pairs; 2 of 5 skipped: " in summary and f"{manifest}:1 is not JSON" in summary, summary
    assert f"{manifest}:4: image not found" in summary, summary
    assert len(ShardDataset(tmp_path / "out").index["skipped_examples"]) == 2


@pytest.mark.parametrize("flag, value", [("--max-bad-fraction", "nan"), ("--max-bad-fraction", "2"),
                                         ("--batch-size", "0"), ("--size", "-16"), ("--shard-size", "0"),
                                         ("--read-threads", "0"), ("--max-image-pixels", "0")])
def test_prepare_checks_its_numbers_before_reading_anything(capsys, tmp_path, flag, value):
    """Every number flag of prepare is range-checked where it is read (--max-bad-fraction nan never stopped)."""
    code = main(["prepare", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--checkpoint", "ck",
                 "--text-encoders", "te", flag, value])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} "), err
    assert "expected a number" in lines[0] and not (tmp_path / "out").exists()


def test_prepare_pairs_the_images_of_subject_folders(capsys, tmp_path, tiny_pipeline_dir, dreambench):
    """Case 26 (part): no example manifest and no way to build one from DreamBench's folders. --format folders
    pairs each image with the next of its subject folder, captioned with the folder's name."""
    from customshift_jax.train.data import BadCounter, records_from_folders

    counter = BadCounter()
    with pytest.warns(BadDataWarning, match="holds 1 image"):
        (tmp_path / "lonely").mkdir()
        shutil.copyfile(dreambench / "cat" / "00.jpg", tmp_path / "lonely" / "00.jpg")
        shutil.copytree(dreambench / "backpack_dog", tmp_path / "backpack_dog")
        records = records_from_folders(tmp_path, counter)
    n = len(list((tmp_path / "backpack_dog").glob("*.jpg")))
    assert len(records) == counter.total == n and records[0].caption == "a photo of a backpack dog"
    assert records[0].reference.endswith(f"0{n - 1}.jpg") and records[0].target.endswith("00.jpg")
    assert main(["prepare", str(dreambench / "dog"), str(tmp_path / "out"), "--format", "folders", "--checkpoint",
                 str(tiny_pipeline_dir), "--text-encoders", str(tiny_pipeline_dir), "--size", "16",
                 "--max-sequence-length", "8", "--no-progress"]) == 0
    assert len(ShardDataset(tmp_path / "out")) == len(list((dreambench / "dog").glob("*.jpg")))
