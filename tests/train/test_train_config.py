"""The training config is checked where it is read: every number in its range, every word among its choices,
invalid YAML as one line naming the file and line; `customshift train` says so in one line and writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from customshift_jax.cli.main import main
from customshift_jax.train.config import CHOICES, DEFAULTS_FLAT, RANGES, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
REQUIRED = ["output_dir=o", "data.path=d"]


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI: exit 2, exactly one `error: ...` line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("override", ["train.steps=-5", "checkpoint.every=0"])
def test_train_refuses_numbers_out_of_range_in_one_line(capsys, tmp_path, override):
    """Cases 9 and 15: `train.steps=-5` trained nothing and exported an untrained LoRA (exit 0); `checkpoint.every=0`
    was a ZeroDivisionError traceback after compiling. Both are refused before anything runs, naming the key."""
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["train", "--config", str(TINY), f"output_dir={out}", f"data.path={tmp_path}",
                                    override])
    assert f"config key {override.split('=')[0]}=" in line and "expected an integer >= 1" in line, line
    assert not out.exists()


def test_every_number_has_a_range_and_out_of_range_names_the_key():
    """Each numeric key of DEFAULTS is listed in RANGES; a value outside (or NaN / inf) is one line naming it."""
    numeric = {k for k, v in DEFAULTS_FLAT.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(RANGES), sorted(numeric - set(RANGES))
    for key, rule in RANGES.items():
        bad = [".nan", ".inf"] + ([str(rule.low - 1)] if rule.low is not None else [])
        if rule.high is not None:
            bad.append(str(rule.high + 1))
        for value in bad:
            with pytest.raises(ValueError, match=rf"^config key {key}=\S+: expected ") as e:
                load_config(TINY, [*REQUIRED, f"{key}={value}"])
            assert "\n" not in str(e.value)


def test_words_are_checked_and_in_step_with_the_code_that_takes_them():
    from customshift_jax.customshift.cads import FORMS, SHIFTS
    from customshift_jax.models.mmdit.attention import BACKENDS
    from customshift_jax.models.mmdit.options import REMATS
    from customshift_jax.numerics import FLOAT_DTYPES
    from customshift_jax.parallel.sharding import RULE_SETS
    from customshift_jax.train.config import DTYPES

    assert set(CHOICES["train.shift"]) == set(SHIFTS) and set(CHOICES["train.form"]) == set(FORMS)
    assert set(CHOICES["train.remat"]) == set(REMATS) and set(CHOICES["mesh.rules"]) == set(RULE_SETS)
    assert set(DTYPES) == set(FLOAT_DTYPES) and set(CHOICES["model.attention"]) <= set(BACKENDS)
    for key in CHOICES:
        with pytest.raises(ValueError, match=rf"config key {key}='nope': expected one of"):
            load_config(TINY, [*REQUIRED, f"{key}=nope"])
    with pytest.raises(ValueError, match=r"train.steps=2 is fewer than train.accum_steps=4"):
        load_config(TINY, [*REQUIRED, "train.steps=2", "train.accum_steps=4"])
    with pytest.raises(ValueError, match="mesh.data and mesh.fsdp are both -1"):
        load_config(TINY, [*REQUIRED, "mesh.data=-1", "mesh.fsdp=-1"])
    assert load_config(TINY, [*REQUIRED, "mesh.fsdp=-1"])["mesh"]["fsdp"] == -1  # -1: the rest of the devices
    cfg = load_config(TINY, [*REQUIRED, "train.lr=1", "lora.alpha=8"])
    assert type(cfg["train"]["lr"]) is float and type(cfg["lora"]["alpha"]) is float  # typed once, when read


def test_invalid_yaml_is_one_line_naming_the_file_and_line(capsys, tmp_path):
    """Case 16: invalid YAML was an 8-line message; now one line with the file, the line and the column."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny-sd3-medium\ntrain:\n  steps: [1, 2\n  lr: 1.0\n")
    line = _one_line_error(capsys, ["train", "--config", str(bad)])
    assert f"{bad}, line 5" in line and "not valid YAML" in line, line
    with pytest.raises(ValueError, match=r"^override 'train.steps=\[', line 1.*not valid YAML"):
        load_config(TINY, [*REQUIRED, "train.steps=["])


def test_attention_backend_reaches_the_step_builder(tmp_path, monkeypatch):
    """model.attention picks the training step's attention kernel (flash included), for both modes."""
    from customshift_jax.train import loop

    seen = []
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **kw: seen.append(("customshift", a[-1].backend)))
    monkeypatch.setattr(loop, "make_base_train_step", lambda *a, **kw: seen.append(("base", a[-1].backend)))
    for mode in ("customshift", "base"):
        cfg = load_config(TINY, [*REQUIRED, "model.attention=flash", f"train.mode={mode}"])
        config, base = loop.load_base(cfg["model"])
        _, _, step_on = loop.step_parts(cfg, config, base, loop.LoRAConfig(rank=4, alpha=4.0),
                                         loop.make_optimizer(1e-3)[0], None)
        step_on(None)  # off a mesh: the plain step, built with the run options
    assert seen == [("customshift", "flash"), ("base", "flash")]


def test_a_saved_config_of_before_with_the_unset_test_hook_still_loads(tmp_path):
    """`debug.sleep_per_step` left the user config (it is the loop's SLEEP_ENV test hook); old saved configs load."""
    old = tmp_path / "config.yaml"
    old.write_text(TINY.read_text() + "debug: {sleep_per_step: 0.0}\n")
    assert "debug" not in load_config(old, REQUIRED)
    old.write_text(TINY.read_text() + "debug: {sleep_per_step: 0.3}\n")
    with pytest.raises(ValueError, match="CUSTOMSHIFT_TEST_SLEEP_PER_STEP"):
        load_config(old, REQUIRED)


def test_the_schedule_shift_old_key_still_loads(tmp_path):
    """`sample.shift` (the scheduler's shift) is `sample.schedule_shift` now, apart from train.shift (cads / concat);
    a config or a run's saved config.yaml with the old key loads as the new one, from the file and an override."""
    old = tmp_path / "config.yaml"
    old.write_text(TINY.read_text() + "sample: {shift: 1.5}\n")
    assert load_config(old, REQUIRED)["sample"]["schedule_shift"] == 1.5
    assert load_config(TINY, [*REQUIRED, "sample.shift=2.0"])["sample"]["schedule_shift"] == 2.0
    assert "shift" not in load_config(TINY, REQUIRED)["sample"]

def test_a_flash_training_step_equals_the_xla_one(tmp_path):
    """model.attention=flash trains through the Pallas kernels (interpret mode on CPU): one step's loss, gradient
    norm and updated LoRAs equal the xla backend's."""
    import jax
    from train_fixtures import write_synthetic_dataset

    from customshift_jax.numerics import relative_error
    from customshift_jax.train import loop

    data = write_synthetic_dataset(tmp_path / "data")
    got = {}
    for backend in ("xla", "flash"):
        cfg = load_config(TINY, [f"data.path={data}", f"output_dir={tmp_path / 'o'}", f"model.attention={backend}",
                                 "model.num_layers=1", "data.shuffle=false", "data.flip_prob=0.0",
                                 "train.warmup_steps=0"])
        parts = loop.build(cfg)
        state, metrics = parts.jstep(parts.state, parts.base, parts.put_batch(next(parts.it)))
        got[backend] = (metrics, jax.tree_util.tree_leaves(state.trainable))
    (m_xla, p_xla), (m_flash, p_flash) = got["xla"], got["flash"]
    for key in ("loss", "grad_norm"):
        assert relative_error(m_flash[key], m_xla[key]) <= 1e-5, key
    assert max(relative_error(a, b) for a, b in zip(p_flash, p_xla)) <= 1e-5
