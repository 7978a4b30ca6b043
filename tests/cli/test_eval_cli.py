"""`customshift bench-generate` and `customshift eval` end to end on the tiny pipeline and tiny metric models."""
import csv
import json

import pytest

from customshift_jax.cli.main import main

SMALL = ["--subjects", "dog,backpack", "--max-prompts", "2", "--images-per-prompt", "2", "--steps", "2",
         "--guidance", "1", "--height", "16", "--width", "24", "--max-sequence-length", "16"]
IMAGES = [f"{s}/{p:02d}_{k}.png" for s in ("dog", "backpack") for p in range(2) for k in range(2)]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def generated(tiny_pipeline_dir, dreambench, tmp_path_factory):
    """The 8 images, made by a run stopped early in one shard and a full rerun; (folder, mtimes after each, argv)."""
    out = tmp_path_factory.mktemp("bench") / "ours"
    argv = ["bench-generate", "--data", str(dreambench), "--checkpoint", str(tiny_pipeline_dir), "--out", str(out),
            "--text-cache", str(out.parent / "text"), *SMALL]
    stamps = []
    for extra in (["--shard", "1/2", "--limit", "3"], []):
        assert main(argv + extra) == 0
        stamps.append({p: (out / p).stat().st_mtime_ns for p in IMAGES if (out / p).exists()})
    return out, stamps, argv


def test_bench_generate_resumes_without_redoing_or_losing(generated, dreambench, capsys):
    out, stamps, argv = generated
    # shard 1/2 is the second subject; --limit 3 stopped it after three images, inside a prompt's batch
    assert sorted(stamps[0]) == ["backpack/00_0.png", "backpack/00_1.png", "backpack/01_0.png"]
    assert len(stamps[1]) == 8 and all(stamps[1][p] == t for p, t in stamps[0].items())  # none redone, none lost
    assert not [p for p in out.rglob(".*")]  # no temp file left behind
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(IMAGES)
    assert {r["reference"] for r in rows if r["subject"] == "dog"} == {str(dreambench / "dog" / "00.jpg")}
    assert rows[0]["prompt"] == "a dog in the jungle" and rows[0]["settings"]["steps"] == 2
    code, stdout, err = _run(capsys, *argv)  # all there: nothing to do
    assert code == 0 and "8 already there, 0 written" in stdout, stdout + err
    code, stdout, err = _run(capsys, *argv[:-1], "3")  # other settings into the same folder: refused
    assert code == 2 and "made with other settings (max_sequence_length differ)" in err, err


def _eval(capsys, models, data, tmp_path, *argv):
    clip, dino = models
    return _run(capsys, "eval", "--data", str(data), "--dino", str(dino), "--clip", str(clip), "--cache",
                str(tmp_path / "cache"), *argv)


def _csv_manifest(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "subject", "prompt", "seed"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_eval_of_folder_and_of_manifest_agree(generated, eval_models, dreambench, tmp_path, capsys):
    out, _, _ = generated
    code, stdout, err = _eval(capsys, eval_models, dreambench, tmp_path, "--images", str(out), "--out", str(tmp_path / "a"))
    assert code == 0, err
    ours = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert ours["groups"]["all"]["images"] == 8 and ours["skipped"]["count"] == 0
    assert ours["subjects"]["dog"]["live"] and not ours["subjects"]["backpack"]["live"]
    assert ours["protocol"]["images_per_prompt"] == 2 and ours["protocol"]["seeds"] == [0, 1]
    assert ours["protocol"]["reference"] == "first" and "crop 224" in ours["protocol"]["dino"]["preprocessing"]
    assert "| all | 2 | 8 |" in stdout and (tmp_path / "a" / "scores.csv").is_file()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    manifest = _csv_manifest(tmp_path / "other.csv", [dict(path=str(out / r["image"]), subject=r["subject"],
                                                           prompt=r["prompt"], seed=r["seed"]) for r in rows])
    code, stdout, err = _eval(capsys, eval_models, dreambench, tmp_path, "--manifest", str(manifest), "--out", str(tmp_path / "b"))
    assert code == 0 and "42 cached, 0 computed" in stdout, err  # 2 models x (8 images + 11 photos) + 4 prompts
    theirs = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert theirs["subjects"] == ours["subjects"] and theirs["groups"] == ours["groups"]
    code, stdout, err = _run(capsys, "eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 2 and "different protocols (reference: 'first' vs 'unstated')" in err, err
    code, stdout, err = _eval(capsys, eval_models, dreambench, tmp_path, "--manifest", str(manifest), "--out", str(tmp_path / "b"),
                              "--reference-rule", "first")
    code, stdout, err = _run(capsys, "eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0 and stdout.count("| all |") == 2, err


def test_missing_and_unreadable_images_are_counted_skips(generated, eval_models, dreambench, tmp_path, capsys):
    out, _, _ = generated
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    listed = [dict(path=str(out / r["image"]), subject=r["subject"], prompt=r["prompt"], seed=r["seed"]) for r in rows]
    listed[0]["path"] = str(tmp_path / "gone.png")
    listed[5]["path"] = str(tmp_path / "broken.png")
    manifest = _csv_manifest(tmp_path / "m.csv", listed)
    code, _, err = _eval(capsys, eval_models, dreambench, tmp_path, "--manifest", str(manifest), "--out", str(tmp_path))
    assert code == 0 and "2 of 8 images skipped (1 missing, 1 unreadable)" in err, err
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["groups"]["all"]["images"] == 6 and result["subjects"]["dog"]["skipped"] == 1
    assert result["skipped"]["missing"] == [str(tmp_path / "gone.png")]


@pytest.mark.parametrize("case", ["unknown_subject", "clip_is_vit", "dino_is_clip", "no_manifest", "all_missing"])
def test_bad_input_is_a_clear_error(case, eval_models, dreambench, tmp_path, capsys):
    clip, dino = eval_models
    manifest = _csv_manifest(tmp_path / "m.csv", [dict(path="x.png", subject="dog", prompt="a dog", seed=0)])
    argv = ["--manifest", str(manifest)]
    if case == "unknown_subject":
        manifest = _csv_manifest(tmp_path / "m.csv", [dict(path="x.png", subject="unicorn", prompt="a", seed=0)])
        expect = "row 1: subject 'unicorn' is not a dreambench subject (known: backpack"
    elif case == "clip_is_vit":
        argv += ["--clip", str(dino)]
        expect = f"--clip {dino} holds a 'vit' model; expected a CLIP model"
    elif case == "dino_is_clip":
        argv += ["--dino", str(clip)]
        expect = f"--dino {clip} holds a 'clip' model; expected a DINO ViT"
    elif case == "no_manifest":
        argv = ["--images", str(tmp_path)]
        expect = "no manifest.jsonl; give a folder written by `customshift bench-generate`"
    else:
        expect = "none of the 1 images of"
    code, _, err = _eval(capsys, eval_models, dreambench, tmp_path, *argv)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
