"""`customshift generate` on bad numbers, bad files, planted links and Ctrl-C (issue 26: 6, 7, 12, 18, 20, 21, 24,
25): each refused in one line naming the flag or file, before anything is written."""
import json
import os
import signal

import pytest
from conftest import DOG

from customshift_jax.cli.main import build_parser, main

SIZE = ["--height", "16", "--width", "24"]  # tiny VAE scale 2 x patch 2: latents 8 x 12


@pytest.fixture(scope="module")
def embeds_file(embeds_with_subject):
    """Two prompts' embeddings, with the subject's (no text encoders needed)."""
    return embeds_with_subject


@pytest.fixture
def base(tiny_checkpoint_dir, embeds_file):
    return ["--checkpoint", str(tiny_checkpoint_dir), "--embeds", str(embeds_file), *SIZE, "--steps", "1"]


def _run(capsys, *argv):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    from customshift_jax import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(pipeline, "load_components", refuse)


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-inf"),
                                        ("--gamma", "nan"), ("--gamma", "inf")])
def test_non_finite_float_flags_are_refused_before_loading(flag, value, base, no_loading, tmp_path, capsys):
    """Case 6: NaN guidance made the picture of guidance 1 with exit 0."""
    code, out, err = _run(capsys, *base, f"{flag}={value}", "--out", str(tmp_path / "o"))
    assert code == 2 and flag in _one_line(err) and "finite" in err, err
    assert not (tmp_path / "o").exists()


def test_pipeline_api_refuses_non_finite_and_huge_batches(tiny_checkpoint_dir, embeds_file):
    from customshift_jax import CustomShiftPipeline
    from customshift_jax.text import PromptEmbeds

    pipe = CustomShiftPipeline.from_pretrained(tiny_checkpoint_dir, progress=False)
    embeds = PromptEmbeds.load_npz(embeds_file)
    for name, kw in (("guidance_scale", dict(guidance_scale=float("nan"))),
                     ("gamma", dict(gamma=float("inf"))),
                     ("num_images_per_prompt", dict(num_images_per_prompt=100_000_000))):
        with pytest.raises(ValueError, match=name):
            pipe(prompt_embeds=embeds, height=16, width=24, num_inference_steps=1, **kw)


@pytest.mark.parametrize("flags,expect", [(["--height", "0"], "--height 0"), (["--width=-16"], "--width -16"),
                                          (["--height", "18"], "multiples of 4")])
def test_bad_sizes_name_the_flag(flags, expect, base, tmp_path, capsys):
    """Case 7: --height 0 silently meant the default size (a 32x16 PNG)."""
    code, out, err = _run(capsys, *base, *flags, "--out", str(tmp_path / "o"))
    assert code == 2 and expect in _one_line(err), err
    assert not (tmp_path / "o").exists()


def test_huge_num_images_is_refused_from_the_batch_memory(base, tmp_path, capsys):
    """Case 12: --num-images 100000000 was a numpy _ArrayMemoryError traceback."""
    code, out, err = _run(capsys, *base, "--num-images", "100000000", "--out", str(tmp_path / "o"))
    line = _one_line(err)
    assert code == 2 and "--num-images 100000000 needs at least" in line and "GiB" in line and "at most" in line


def test_batch_memory_bound_is_computed_from_the_images():
    from customshift_jax.models.mmdit.config import MMDiTConfig
    from customshift_jax.pipeline import check_batch_memory

    config = MMDiTConfig(in_channels=16)
    text = 2 * (333 * config.joint_attention_dim + config.pooled_projection_dim)  # with the negatives
    per_image = 4 * (2 * 16 * 128 * 128 + 3 * 1024 * 1024 + text)
    check_batch_memory(config, 8, 1024, 1024, 10, text_tokens=333, available=10 * per_image)  # fits exactly
    with pytest.raises(ValueError, match=r"--num-images 11 .* give at most 10\."):
        check_batch_memory(config, 8, 1024, 1024, 11, text_tokens=333, available=10 * per_image)


@pytest.mark.parametrize("planted", ["settings.json", "z.npy"])
def test_planted_link_refuses_the_run_before_any_png(planted, base, tmp_path, capsys):
    """Case 18: the link was refused only after this run's PNGs were written."""
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "target").write_text("keep")
    (out / planted).symlink_to(tmp_path / "target")
    code, _, err = _run(capsys, *base, "--out", str(out), "--save-latents", str(out / "z.npy"))
    assert code == 2 and "symbolic link" in _one_line(err), err
    assert sorted(p.name for p in out.iterdir()) == [planted]
    assert (tmp_path / "target").read_text() == "keep"


def test_ctrl_c_stops_between_steps_and_writes_what_is_done(base, tmp_path, capsys, monkeypatch):
    """Case 20: Ctrl-C waited for the prompt's last step, then left --out empty with no settings.json."""
    from customshift_jax.pipeline import StepProgress

    steps, calls = 6, []
    step = StepProgress.__call__

    def press_ctrl_c_in_prompt_two(self, index):
        calls.append(int(index))
        if len(calls) == steps + 2:  # prompt 2, step 2 of 6
            os.kill(os.getpid(), signal.SIGINT)
            import time

            time.sleep(0.2)  # the signal has landed
        step(self, index)

    monkeypatch.setattr(StepProgress, "__call__", press_ctrl_c_in_prompt_two)
    argv = [a if a != "1" else str(steps) for a in base]  # --steps 6
    code, out, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--save-latents", str(tmp_path / "z.npy"))
    assert code == 130, err
    assert len(calls) < 2 * steps, calls  # stopped before prompt 2's last step
    assert any(line.startswith("interrupted") for line in err.splitlines()), err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["000_00.png", "settings.json"]
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["interrupted"].startswith("by Ctrl-C after 1 of 2 prompts"), settings
    assert not (tmp_path / "z.npy").exists()


def test_every_subcommand_type_error_is_one_line(capsys):
    """Case 21: --gamma high printed the whole usage before the error."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", "x", "--gamma", "high"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --gamma: invalid float value: 'high'\n"
    parser = build_parser()
    for name, sub in parser.subcommands.items():
        typed = [a for a in sub._actions if a.option_strings and a.type in (int, float)]
        for action in typed[:1]:
            with pytest.raises(SystemExit):
                main([name, action.option_strings[0], "high"])
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and "invalid" in err, (name, err)


def test_reference_without_lora_says_the_branches_are_untrained(base, tmp_path, capsys):
    """Case 24: the untrained branches ran without a word."""
    code, out, err = _run(capsys, *base, "--reference", str(DOG), "--out", str(tmp_path / "o"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "untrained" in notes[0] and "--lora" in notes[0], err


def test_text_file_as_reference_is_named(base, tmp_path, capsys):
    """Case 25: 'cannot identify image file <_io.BytesIO object at 0x...>'."""
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    code, out, err = _run(capsys, *base, "--reference", str(text), "--out", str(tmp_path / "o"))
    line = _one_line(err)
    assert code == 2 and str(text) in line and "not an image" in line and "BytesIO" not in line, err


def test_lora_of_another_model_is_one_short_line(base, tiny_checkpoint_dir, tmp_path, capsys):
    """Case 25: about 700 characters of keys and shapes."""
    import jax

    from customshift_jax import MMDiTConfig
    from customshift_jax.customshift.branches import init_lora
    from customshift_jax.io.checkpoint import load_checkpoint
    from customshift_jax.io.lora_files import save_lora_files, to_state_dict
    from customshift_jax.models.mmdit.lora import LoRAConfig

    config = load_checkpoint(tiny_checkpoint_dir, ["transformer"])["transformer"][0]
    other = MMDiTConfig.from_diffusers_config({**config.to_diffusers_config(),
                                               "num_layers": config.num_layers + 1})
    lora = LoRAConfig(rank=2, alpha=2.0)
    bad = tmp_path / "other_model"
    save_lora_files(bad, to_state_dict(init_lora(other, lora, jax.random.key(0), branch="rab"),
                                       init_lora(other, lora, jax.random.key(1), branch="cgb")), lora)
    code, out, err = _run(capsys, *base, "--reference", str(DOG), "--lora", str(bad), "--out", str(tmp_path / "o"))
    line = _one_line(err)
    assert code == 2 and "does not fit this model" in line and "unexpected" in line and len(line) < 400, line


def test_empty_prompt_is_said_to_be_empty(tiny_checkpoint_dir, tmp_path, capsys):
    code, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint_dir), "--prompt", "", "--out",
                          str(tmp_path / "o"))
    assert code == 2 and "--prompt is empty" in _one_line(err), err


@pytest.mark.parametrize("flag", ["--prompts-file", "--embeds"])
@pytest.mark.parametrize("kind", ["device", "FIFO"])
def test_device_or_fifo_input_is_named(flag, kind, tiny_checkpoint_dir, tmp_path, capsys):
    path = "/dev/zero"
    if kind == "FIFO":
        path = str(tmp_path / "pipe")
        os.mkfifo(path)
    code, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint_dir), flag, path, *SIZE, "--steps", "1",
                          "--out", str(tmp_path / "o"))
    line = _one_line(err)
    assert code == 2 and path in line and f"is a {kind}, not a regular file" in line, line


def test_init_latents_that_are_not_an_array_are_named(base, tmp_path, capsys):
    text = tmp_path / "x.npy"
    text.write_text("not an array")
    for path, expect in (("/dev/zero", "is a device, not a regular file"), (str(text), "cannot be read as a .npy")):
        code, out, err = _run(capsys, *base, "--init-latents", path, "--out", str(tmp_path / "o"))
        line = _one_line(err)
        assert code == 2 and f"--init-latents {path}" in line and expect in line, line
