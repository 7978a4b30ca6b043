"""`customshift generate` end to end on a tiny local pipeline: parity through the CLI, CustomShift, bad input."""
import json
import re

import numpy as np
import pytest
from conftest import DOG
from PIL import Image

from customshift_jax.cli.main import main
from customshift_jax.numerics import relative_error

SIZE = ["--height", "16", "--width", "24"]  # tiny VAE scale 2 x patch 2: latents 8 x 12


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir):
    """The tiny pipeline converted to our checkpoint (session fixture)."""
    return tiny_checkpoint_dir


@pytest.fixture(scope="module")
def embeds_file(tiny_pipeline_dir, tmp_path_factory):
    from customshift_jax.text import TextEncoders

    encoders = TextEncoders.from_pretrained(tiny_pipeline_dir)
    embeds = encoders.encode(["a dog on the beach", "a dog in the snow"], max_sequence_length=16)
    path = tmp_path_factory.mktemp("embeds") / "embeds.npz"
    embeds.save_npz(path)
    subject = encoders.encode(["dog"], max_sequence_length=16, do_classifier_free_guidance=False)
    with_subject = path.with_name("with_subject.npz")
    np.savez(with_subject, **embeds.arrays(), subject_embeds=subject.prompt_embeds,
             subject_pooled_embeds=subject.pooled_prompt_embeds)
    return path, with_subject


def _run(capsys, *argv):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_cli_latents_match_diffusers_pipeline(checkpoint, embeds_file, tiny_pipeline_dir, tmp_path, capsys):
    import torch
    from diffusers import StableDiffusion3Pipeline

    embeds, _ = embeds_file
    init = np.random.default_rng(0).standard_normal((2, 16, 8, 12)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    code, out, err = _run(capsys, "--checkpoint", str(checkpoint), "--embeds", str(embeds), *SIZE, "--steps", "3",
                          "--guidance", "5", "--init-latents", str(tmp_path / "init.npy"), "--save-latents",
                          str(tmp_path / "z.npy"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    ours = np.load(tmp_path / "z.npy")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir)
    data = np.load(embeds)
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.from_numpy(data["prompt_embeds"]),
                   pooled_prompt_embeds=torch.from_numpy(data["pooled_prompt_embeds"]),
                   negative_prompt_embeds=torch.from_numpy(data["negative_prompt_embeds"]),
                   negative_pooled_prompt_embeds=torch.from_numpy(data["negative_pooled_prompt_embeds"]),
                   latents=torch.from_numpy(init), num_inference_steps=3, guidance_scale=5.0, height=16, width=24,
                   output_type="latent").images.numpy()
    assert relative_error(ours, ref) <= 1e-4
    png = Image.open(tmp_path / "out" / "001_00.png")
    assert png.size == (24, 16)
    assert json.loads(png.text["parameters"])["guidance"] == 5.0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["guidance"] == 5.0 and not [k for k in settings if k.startswith("_")], settings


def test_text_encoders_and_customshift_reference(checkpoint, tiny_pipeline_dir, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--text-encoders", str(tiny_pipeline_dir), "--prompt",
              "a dog on the beach", *SIZE, "--steps", "2", "--max-sequence-length", "16",
              "--text-cache", str(tmp_path / "cache")]
    code, out, err = _run(capsys, *common, "--out", str(tmp_path / "plain"), "--save-latents", str(tmp_path / "a.npy"))
    assert code == 0, err
    code, out, err = _run(capsys, *common, "--out", str(tmp_path / "ref"), "--reference", str(DOG), "--subject",
                          "dog", "--gamma", "1.5", "--save-latents", str(tmp_path / "b.npy"))
    assert code == 0, err
    meta = json.loads(Image.open(tmp_path / "ref" / "000_00.png").text["parameters"])
    assert meta["subject"] == "dog" and meta["gamma"] == 1.5
    assert relative_error(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy")) > 1e-4  # the reference acts


def test_reference_from_embeds_file_only(checkpoint, embeds_file, tmp_path, capsys):
    _, with_subject = embeds_file
    code, out, err = _run(capsys, "--checkpoint", str(checkpoint), "--embeds", str(with_subject), *SIZE,
                          "--steps", "2", "--reference", str(DOG), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert (tmp_path / "o" / "001_00.png").exists()


def test_lora_folder_is_loaded_and_checked(checkpoint, embeds_file, tmp_path, capsys, monkeypatch):
    import jax

    from customshift_jax import MMDiTConfig
    from customshift_jax.customshift.branches import init_lora
    from customshift_jax.io.checkpoint import load_checkpoint
    from customshift_jax.io.lora_files import save_lora_files, to_state_dict
    from customshift_jax.models.mmdit.lora import LoRAConfig

    _, with_subject = embeds_file
    config = load_checkpoint(checkpoint, ["transformer"])["transformer"][0]
    lora = LoRAConfig(rank=2, alpha=2.0)
    good = tmp_path / "good"
    save_lora_files(good, to_state_dict(init_lora(config, lora, jax.random.key(0), branch="rab"),
                                        init_lora(config, lora, jax.random.key(1), branch="cgb")), lora)
    argv = ["--checkpoint", str(checkpoint), "--embeds", str(with_subject), *SIZE, "--steps", "1",
            "--reference", str(DOG), "--out", str(tmp_path / "o")]
    code, out, err = _run(capsys, *argv, "--lora", str(good))
    assert code == 0, err
    meta = json.loads(Image.open(tmp_path / "o" / "000_00.png").text["parameters"])
    assert meta["lora"] == str(good) and meta["gamma"] == 1.0, meta  # the PNG records what shaped it
    other = MMDiTConfig.from_diffusers_config({**config.to_diffusers_config(), "num_layers": config.num_layers + 1})
    bad = tmp_path / "other_model"
    save_lora_files(bad, to_state_dict(init_lora(other, lora, jax.random.key(0), branch="rab"),
                                       init_lora(other, lora, jax.random.key(1), branch="cgb")), lora)
    code, out, err = _run(capsys, *argv, "--lora", str(good / "customshift_cgb.safetensors"))  # a file: its folder
    assert code == 0, err
    from customshift_jax import pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the LoRA was checked")

    monkeypatch.setattr(pipeline, "load_components", no_loading)
    code, out, err = _run(capsys, *argv, "--lora", str(bad))
    # The other model's extra layer: its keys counted and the first named (not all of them), before any loading.
    assert code != 0 and re.search(r"\d+ unexpected: rab\.transformer_blocks\.\d+\.", err), err
    assert "more." in err and len(err) < 700, err


def test_mesh_gives_the_unsharded_latents(checkpoint, embeds_file, tmp_path, capsys):
    """--mesh/--rules: the sharded SD3 and CustomShift samplers (and prefill) equal the unsharded CLI (DESIGN 5)."""
    _, with_subject = embeds_file
    init = np.random.default_rng(1).standard_normal((4, 16, 8, 12)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    argv = ["--checkpoint", str(checkpoint), "--embeds", str(with_subject), *SIZE, "--steps", "2", "--guidance", "4",
            "--num-images", "2", "--init-latents", str(tmp_path / "init.npy"), "--out", str(tmp_path / "o")]
    for reference in ([], ["--reference", str(DOG), "--gamma", "1.5"]):
        latents = {}
        for name, mesh in (("plain", []), ("sharded", ["--mesh", "data=2,fsdp=-1", "--rules", "fsdp"])):
            path = tmp_path / f"{name}{len(reference)}.npy"
            code, out, err = _run(capsys, *argv, *reference, *mesh, "--save-latents", str(path))
            assert code == 0, err
            latents[name] = np.load(path)
        assert relative_error(latents["sharded"], latents["plain"]) <= 1e-5, reference
    code, out, err = _run(capsys, *argv, "--mesh", "data=3,fsdp=2")
    assert code != 0 and "make 6 devices, but there are 8" in err, err
    code, out, err = _run(capsys, *argv, "--mesh", "data=2", "--rules", "zero3")
    assert code != 0 and "unknown rule set" in err, err


@pytest.mark.parametrize("case", ["missing_checkpoint", "bad_size", "empty_prompts", "bad_init_latents",
                                  "embeds_missing_array", "unreadable_reference", "empty_subject", "no_text",
                                  "lora_without_reference", "out_is_a_file", "embeds_wrong_width"])
def test_bad_input_is_a_clear_error(case, checkpoint, embeds_file, tmp_path, capsys):
    embeds, with_subject = embeds_file
    base = ["--checkpoint", str(checkpoint), "--embeds", str(embeds), *SIZE, "--steps", "1", "--out",
            str(tmp_path / "o")]
    with_ref = ["--checkpoint", str(checkpoint), "--embeds", str(with_subject), *SIZE]
    if case == "missing_checkpoint":
        argv, expect = ["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "no such file or folder"
    elif case == "bad_size":
        argv, expect = base[:4] + ["--height", "18", "--width", "24"], "must be positive multiples of 4"
    elif case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n# nothing\n\n")
        argv, expect = ["--checkpoint", str(checkpoint), "--prompts-file", str(tmp_path / "p.txt")], "holds no prompts"
    elif case == "bad_init_latents":
        np.save(tmp_path / "x.npy", np.zeros((2, 16, 8, 8), np.float32))
        argv, expect = base + ["--init-latents", str(tmp_path / "x.npy")], "expected (2, 16, 8, 12)"
    elif case == "embeds_missing_array":
        data = dict(np.load(embeds))
        data.pop("pooled_prompt_embeds")
        np.savez(tmp_path / "e.npz", **data)
        argv, expect = ["--checkpoint", str(checkpoint), "--embeds", str(tmp_path / "e.npz")], "pooled_prompt_embeds"
    elif case == "unreadable_reference":
        (tmp_path / "bad.jpg").write_bytes(b"not an image")
        argv, expect = with_ref + ["--reference", str(tmp_path / "bad.jpg")], "cannot be read"
    elif case == "empty_subject":
        argv, expect = base + ["--reference", str(DOG), "--subject", "  "], "--subject is empty"
    elif case == "embeds_wrong_width":
        data = dict(np.load(embeds))
        data["prompt_embeds"] = data["prompt_embeds"][..., :5]
        np.savez(tmp_path / "narrow.npz", **data)
        argv, expect = base[:2] + ["--embeds", str(tmp_path / "narrow.npz")] + base[4:], "prompt_embeds are 5 wide"
    elif case == "out_is_a_file":
        (tmp_path / "taken").write_text("notes")
        argv, expect = base[:-2] + ["--out", str(tmp_path / "taken")], "is a file; give a folder"
        argv[1] = str(tmp_path / "nope")  # refused before the (missing) checkpoint is even looked at
    elif case == "lora_without_reference":
        argv, expect = base + ["--lora", str(tmp_path)], "--lora applies to CustomShift runs"
    else:
        argv, expect = ["--checkpoint", str(checkpoint), "--prompt", "x"], "has no text encoders"
    code, out, err = _run(capsys, *argv)
    assert code != 0
    assert expect in err, err


def test_load_vae_reads_our_checkpoint(checkpoint, tiny_pipeline_dir):
    from customshift_jax.io.loading import load_vae
    from customshift_jax.tree_paths import named_leaves

    config_a, params_a = load_vae(checkpoint)
    config_b, params_b = load_vae(tiny_pipeline_dir)
    assert config_a == config_b
    flat_a, flat_b = dict(named_leaves(params_a)), dict(named_leaves(params_b))
    assert sorted(flat_a) == sorted(flat_b) and flat_a
    for path, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=path)


def test_default_output_folder_never_overwrites(tmp_path):
    from customshift_jax.cli.generate_cmd import output_folder

    assert output_folder(None, tmp_path) == tmp_path / "out"
    (tmp_path / "out").mkdir()
    assert output_folder(None, tmp_path) == tmp_path / "out"  # empty: used
    (tmp_path / "out" / "000_00.png").write_bytes(b"x")
    assert output_folder(None, tmp_path) == tmp_path / "out-2"
    assert output_folder(str(tmp_path / "mine"), tmp_path) == tmp_path / "mine"
