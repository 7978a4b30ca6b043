"""`customshift demo` with the shipped world weights: CustomShift keeps held-out subjects' identity far better
than the text-only base model while following the prompt about as well (DESIGN section 8). A change that breaks
the branches, the cache, the shift or the sampler fails here even where the parity tests pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from customshift_jax.cli.main import main
from customshift_jax.toyworld.methods import WEIGHTS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model").is_dir(), reason="no shipped world weights")

SUBJECTS, SEED = 16, 7
# Measured with the shipped weights (third build's base, LoRAs of 6000 steps, CFG 3) on these 16 held-out subjects
# (gamma 1): identity cosine 0.799 (CustomShift) vs 0.356 (text only); body and accent accuracy 0.812 / 0.938 vs
# 0.000 / 0.250; prompt all 1.000 both; the oracle 1.000 subject all, 1.000 prompt all. Margins: about half the
# measured gaps, and two images (2/16) of slack on prompt fidelity, a count, since CPUs round differently.
MARGIN_COSINE = 0.22
MARGIN_COLOURS = 0.37
MARGIN_PROMPT = 0.13


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--seed", str(SEED), "--subjects", str(SUBJECTS), "--gammas", "1", "--out", str(out)]) == 0
    return out


def test_demo_writes_grid_images_and_json(demo):
    subjects = json.loads((demo / "subjects.json").read_text())["subjects"]
    _check_grid(demo, subjects)
    assert len(subjects) == SUBJECTS
    for s in subjects:
        assert len(s["body_rgb"]) == 3 and len(s["accent_rgb"]) == 3
        assert {i["method"] for i in s["images"]} == {"text only", "concat (training-free)", "concat (trained)",
                                                      "customshift ref-guided", "customshift"} | (
            {"joint (trained)"} if (WEIGHTS / "joint").is_dir() else set())
        for i in s["images"]:
            assert (demo / i["file"]).is_file() and {"scene", "position", "size"} <= set(i)


def _check_grid(demo, subjects) -> None:
    """grid.png decodes, is one row a subject and one column a method (after the reference), each tile being that
    image's PNG drawn SCALE times larger, beside the labels' margins (`figures.grid`: 150 px left, 34 px top,
    4 px between tiles)."""
    from customshift_jax.toyworld.figures import SCALE

    with Image.open(demo / "grid.png") as im:
        grid = np.asarray(im.convert("RGB"))  # decodes the whole file
    columns = 1 + len(subjects[0]["images"])
    cell, pad, top, left = 32 * SCALE, 4, 34, 150
    assert grid.shape == (top + SUBJECTS * (cell + pad), left + columns * (cell + pad), 3), grid.shape
    for i in (0, SUBJECTS - 1):
        files = [subjects[i]["reference"]["file"]] + [e["file"] for e in subjects[i]["images"]]
        for j, file in enumerate(files):
            y, x = top + i * (cell + pad), left + j * (cell + pad)
            tile = np.asarray(Image.open(demo / file).convert("RGB")).repeat(SCALE, 0).repeat(SCALE, 1)
            np.testing.assert_array_equal(grid[y:y + cell, x:x + cell], tile, err_msg=f"subject {i}, {file}")


def test_demo_scores(demo):
    table = json.loads((demo / "scores.json").read_text())["table"]
    text, cs = table["text only"], table["customshift gamma=1"]
    oracle = table["oracle (real renders)"]
    assert oracle["subject_all"] >= 0.9 and oracle["context_all"] >= 0.95, oracle
    assert cs["identity_cosine"] >= text["identity_cosine"] + MARGIN_COSINE, (cs, text)
    colours = lambda r: (r["body"] + r["accent"]) / 2  # noqa: E731
    assert colours(cs) >= colours(text) + MARGIN_COLOURS, (cs, text)
    assert cs["context_all"] >= text["context_all"] - MARGIN_PROMPT, (cs, text)


@pytest.mark.parametrize("args, message", [
    (["--out", "FILE"], "is a file"),
    (["--subjects", "0"], "--subjects 0"),
    (["--gammas", "one,two"], "--gammas"),
])
def test_demo_bad_flags_are_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert main(["demo", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_demo_table_carries_standard_errors_and_a_legend(demo):
    from customshift_jax.toyworld.evaluate import TABLE_LEGEND, markdown_table

    table = json.loads((demo / "scores.json").read_text())["table"]
    for row in table.values():
        assert row["images"] == SUBJECTS
        for key in ("body", "subject_all", "context_all"):  # Agresti-Coull: positive even at 0 or 1, < 0.5
            assert 0 < row[f"{key}_se"] < 0.5, row
    text = markdown_table(table)
    assert "±" in text.splitlines()[2] and all(line in text for line in TABLE_LEGEND)
    assert f"N = {SUBJECTS} images" in text


def test_demo_out_holding_a_demo_is_refused_and_the_default_moves_on(demo, tmp_path, capsys):
    from customshift_jax.cli.demo_cmd import output_folder

    before = sorted(p.name for p in demo.rglob("*"))
    assert main(["demo", "--subjects", "1", "--out", str(demo)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a demo" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in demo.rglob("*")) == before  # nothing written into the other run's folder
    assert output_folder(None, tmp_path) == tmp_path / "demo"
    (tmp_path / "demo" / "images").mkdir(parents=True)
    assert output_folder(None, tmp_path) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()  # an empty folder is used, not skipped
    assert output_folder(None, tmp_path) == tmp_path / "demo-2"
