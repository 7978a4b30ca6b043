"""Text settings travel with the model: a checkpoint's (and a LoRA's) recorded T5 length is what `generate`,
`encode`, `prepare`, the demo's world model and `CustomShiftPipeline` encode with by default, an explicit value
that differs is said in one line, a LoRA's record wins over the checkpoint's, convert and train record it, and
the shipped world records the length it was trained with (README's world example pairs `--subject star` with a
star)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from customshift_jax.cli.main import main
from customshift_jax.io import text_settings as ts
from customshift_jax.io.text_settings import TextSettings

RECORDED = 12  # not 256 (the default), not the 16 other tests use
CLIP_TOKENS = 77
SIZE = ["--height", "16", "--width", "24", "--steps", "1"]


@pytest.fixture(scope="module")
def recorded_checkpoint(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline converted to our checkpoint recording T5 length 12 (`convert --max-sequence-length`)."""
    dst = tmp_path_factory.mktemp("recorded") / "ckpt"
    assert main(["convert", str(tiny_pipeline_dir), str(dst), "--max-sequence-length", str(RECORDED),
                 "--no-progress"]) == 0
    return dst


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def _lora(folder: Path, checkpoint: Path, length: int | None) -> Path:
    import jax

    from customshift_jax.customshift.branches import init_lora
    from customshift_jax.io.checkpoint import load_checkpoint_config
    from customshift_jax.io.lora_files import save_lora_files, to_state_dict
    from customshift_jax.models.mmdit.lora import LoRAConfig

    config, lora = load_checkpoint_config(checkpoint, "transformer"), LoRAConfig(rank=2, alpha=2.0)
    save_lora_files(folder, to_state_dict(init_lora(config, lora, jax.random.key(0), branch="rab"),
                                          init_lora(config, lora, jax.random.key(1), branch="cgb")), lora,
                    text_settings=None if length is None else TextSettings(length).to_json())
    return folder


def _generate(capsys, tmp_path, name, *argv) -> tuple[dict, list[str], dict[str, int]]:
    """Run `customshift generate`; (settings.json, the stderr `note:` lines, T5 length of each encoded text)."""
    cache = tmp_path / f"cache-{name}"
    code = main(["generate", *argv, *SIZE, "--text-cache", str(cache), "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    lengths = {}
    for f in cache.rglob("*.npz"):
        with np.load(f) as data:
            lengths[str(data["prompt"])] = data["prompt_embeds"].shape[0] - CLIP_TOKENS
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    return json.loads((tmp_path / name / "settings.json").read_text()), notes, lengths


def test_generate_encodes_at_the_checkpoints_recorded_length(recorded_checkpoint, tiny_pipeline_dir,
                                                             tmp_path, capsys):
    common = ["--checkpoint", str(recorded_checkpoint), "--text-encoders", str(tiny_pipeline_dir),
              "--prompt", "a dog on the beach"]
    settings, notes, lengths = _generate(capsys, tmp_path, "default", *common)
    assert settings["max_sequence_length"] == RECORDED and notes == []
    assert lengths == {"a dog on the beach": RECORDED, "": RECORDED}  # the prompt and the negative
    settings, notes, lengths = _generate(capsys, tmp_path, "flag", *common, "--max-sequence-length", "16")
    assert settings["max_sequence_length"] == 16 and set(lengths.values()) == {16}
    assert len(notes) == 1, notes  # one line, naming the flag, both lengths and where the 12 is recorded
    assert re.match(rf"note: --max-sequence-length 16 differs from the {RECORDED} this model was trained with "
                    rf"\(.*customshift_checkpoint\.json\)", notes[0]), notes
    _, notes, _ = _generate(capsys, tmp_path, "same", *common, "--max-sequence-length", str(RECORDED))
    assert notes == []  # the recorded value given explicitly: nothing to say


def test_a_checkpoint_that_records_nothing_keeps_256(tiny_checkpoint_dir, tiny_pipeline_dir, tmp_path,
                                                     capsys):
    settings, notes, lengths = _generate(capsys, tmp_path, "plain", "--checkpoint", str(tiny_checkpoint_dir),
                                         "--text-encoders", str(tiny_pipeline_dir), "--prompt", "a dog",
                                         "--guidance", "1")
    assert settings["max_sequence_length"] == 256 and lengths == {"a dog": 256} and notes == []


def test_a_loras_recorded_length_wins_with_a_note(recorded_checkpoint, tiny_pipeline_dir, reference_png,
                                                  tmp_path, capsys):
    lora = _lora(tmp_path / "lora", recorded_checkpoint, 10)
    settings, notes, lengths = _generate(
        capsys, tmp_path, "lora", "--checkpoint", str(recorded_checkpoint), "--text-encoders", str(tiny_pipeline_dir),
        "--prompt", "a dog on the beach", "--reference", str(reference_png), "--subject", "dog", "--lora", str(lora),
        "--guidance", "1")
    assert settings["max_sequence_length"] == 10
    assert lengths == {"a dog on the beach": 10, "dog": 10}  # the prompt and the subject's name
    assert len(notes) == 1 and "using the LoRA's" in notes[0] and "T5 length 10" in notes[0], notes


def test_encode_uses_the_recorded_length(recorded_checkpoint, tiny_pipeline_dir, tmp_path, capsys):
    folder = tmp_path / "encoders"  # the tiny diffusers folder's encoders beside a marker that records 12
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.copy(recorded_checkpoint / "customshift_checkpoint.json", folder)
    assert main(["encode", "--text-encoders", str(folder), "--prompt", "a dog", "--subject", "dog",
                 "--text-backend", "torch", "--out", str(tmp_path / "a.npz")]) == 0
    with np.load(tmp_path / "a.npz") as data:
        assert data["prompt_embeds"].shape[1] == data["subject_embeds"].shape[1] == CLIP_TOKENS + RECORDED
    assert "note:" not in capsys.readouterr().err
    assert main(["encode", "--text-encoders", str(folder), "--prompt", "a dog", "--max-sequence-length", "8",
                 "--text-backend", "torch", "--out", str(tmp_path / "b.npz")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--max-sequence-length 8 differs from the 12" in notes[0], notes


def test_prepare_encodes_at_the_checkpoints_recorded_length(recorded_checkpoint, tiny_pipeline_dir,
                                                            reference_png, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"reference": str(reference_png), "target": str(reference_png), "subject": "dog",
                                    "caption": "a dog on the beach"}) + "\n")
    common = ["prepare", str(manifest), "--checkpoint", str(recorded_checkpoint), "--text-encoders",
              str(tiny_pipeline_dir), "--size", "16", "--no-progress"]
    assert main([*common[:2], str(tmp_path / "a"), *common[2:]]) == 0
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    embeds = np.load(next((tmp_path / "a").glob("shard-*/prompt_embeds.npy")))
    assert index["max_sequence_length"] == RECORDED and embeds.shape[1] == CLIP_TOKENS + RECORDED
    assert "note:" not in capsys.readouterr().err
    assert main([*common[:2], str(tmp_path / "b"), *common[2:], "--max-sequence-length", "8"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--max-sequence-length 8 differs from the 12" in notes[0], notes


def test_pipeline_api_uses_the_record_and_warns_on_another(recorded_checkpoint, tiny_pipeline_dir):
    from customshift_jax import CustomShiftPipeline

    pipe = CustomShiftPipeline.from_pretrained(recorded_checkpoint, text_encoders=tiny_pipeline_dir, progress=False)
    assert pipe.text_settings.settings == TextSettings(RECORDED)
    encoder = pipe.text_encoder()
    seen = []
    encode = encoder.encode
    encoder.encode = lambda *a, **k: seen.append(k["max_sequence_length"]) or encode(*a, **k)
    kw = dict(height=16, width=24, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded length: no warning
        pipe("a dog", **kw)
    with pytest.warns(UserWarning, match=rf"max_sequence_length 16 differs from the {RECORDED} this model was "
                                         "trained with"):
        pipe("a dog", max_sequence_length=16, **kw)
    assert seen == [RECORDED, 16]


def test_records_read_back_and_bad_ones_are_named(recorded_checkpoint, tmp_path):
    assert ts.checkpoint_text_settings(recorded_checkpoint).settings == TextSettings(RECORDED)
    lora = _lora(tmp_path / "lora", recorded_checkpoint, 10)
    assert ts.lora_text_settings(lora / "customshift_cgb.safetensors").settings == TextSettings(10)  # its folder
    assert ts.lora_text_settings(_lora(tmp_path / "none", recorded_checkpoint, None)) is None
    notes = []
    assert ts.resolve_max_sequence_length(None, None, notes.append) == ts.DEFAULT_MAX_SEQUENCE_LENGTH == 256
    assert ts.combine(None, None, notes.append) is None and notes == []
    marker = json.loads((recorded_checkpoint / "customshift_checkpoint.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(recorded_checkpoint, bad)
    marker["text_settings"] = {"max_sequence_length": 0}
    (bad / "customshift_checkpoint.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="customshift_checkpoint.json: 'text_settings' is .*expected"):
        ts.checkpoint_text_settings(bad)


def test_training_records_its_datas_length_in_the_lora_and_the_base_model(tmp_path):
    """`customshift train` (a LoRA run and a train.mode=base run; no steps: the exports are what is checked)
    records the prepared data's max_sequence_length in the exported LoRA files and in OUTPUT_DIR/model's marker."""
    import jax
    from train_fixtures import ROOT, write_synthetic_dataset

    from customshift_jax.io.checkpoint import save_checkpoint
    from customshift_jax.models.vae import init_vae
    from customshift_jax.models.vae.config import VAEConfig
    from customshift_jax.train.loop import load_base

    data = write_synthetic_dataset(tmp_path / "data")
    index = json.loads((data / "index.json").read_text())
    (data / "index.json").write_text(json.dumps({**index, "max_sequence_length": 5}))
    config, params = load_base({"checkpoint": None, "preset": "tiny-sd3-medium", "num_layers": 2, "init_seed": 0,
                                "base_dtype": "fp32"})
    vae_config = VAEConfig.tiny()
    save_checkpoint(tmp_path / "init", {"transformer": (config, params),
                                        "vae": (vae_config, init_vae(vae_config, jax.random.key(1)))})
    common = ["train", "--config", str(ROOT / "train" / "configs" / "tiny.yaml"), f"data.path={data}", "train.steps=1",
              "checkpoint.every=1", "log.tensorboard=false", "log.progress=false"]
    assert main([*common, f"output_dir={tmp_path / 'lora'}"]) == 0
    assert main([*common, f"output_dir={tmp_path / 'base'}", "train.mode=base", f"model.checkpoint={tmp_path / 'init'}",
                 "model.preset=null"]) == 0
    assert ts.lora_text_settings(tmp_path / "lora" / "lora").settings == TextSettings(5)
    assert ts.checkpoint_text_settings(tmp_path / "base" / "model").settings == TextSettings(5)


def test_the_shipped_world_records_its_length_and_readme_pairs_a_star_with_a_star():
    from customshift_jax.toyworld import evaluate as E
    from customshift_jax.toyworld.methods import WEIGHTS
    from customshift_jax.toyworld.tiny_sd3 import T5_MAX_LENGTH

    if not (WEIGHTS / "model").is_dir():
        pytest.skip("no shipped world weights")
    assert ts.checkpoint_text_settings(WEIGHTS / "model").settings == TextSettings(T5_MAX_LENGTH)
    for name in ("customshift", "concat"):
        assert ts.lora_text_settings(WEIGHTS / name).settings == TextSettings(T5_MAX_LENGTH)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    demo = shlex.split(re.search(r"^customshift demo (.*?)(?:#|$)", readme, flags=re.M).group(1))
    generate = shlex.split(re.search(r"^customshift generate --checkpoint customshift_jax/toyworld.*?--out \S+",
                                     readme, flags=re.M | re.S).group(0).replace("\\\n", " "))
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert "--max-sequence-length" not in generate  # the recorded length serves
    row = int(re.match(r"demo-seed0/images/(\d+)-reference\.png", flag(generate, "--reference")).group(1))
    case = E.draw_cases(int(flag(demo, "--seed")), int(flag(demo, "--subjects")), 1)[row]
    assert case.subject.name == flag(generate, "--subject"), (case.subject.name, flag(generate, "--subject"))


def test_the_demos_world_model_encodes_at_the_recorded_length(tmp_path, capsys):
    from customshift_jax.toyworld.methods import WEIGHTS, WorldModel

    if not (WEIGHTS / "model").is_dir():
        pytest.skip("no shipped world weights")
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS, weights)
    ts.record_in_checkpoint(weights / "model", TextSettings(16))  # the LoRAs still record 20
    model = WorldModel.load(weights)
    assert model.max_sequence_length == 16
    embeds, _ = model.encode_text(["a star on the beach, left, large"])
    assert embeds.shape[1] == WorldModel.load(WEIGHTS).encode_text(["a star"])[0].shape[1] - 4
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == len(model.loras) >= 2, notes  # one per LoRA folder shipped (customshift, concat, ...)
    assert all("trained with T5 length 20" in n and "encodes at 16" in n for n in notes), notes
