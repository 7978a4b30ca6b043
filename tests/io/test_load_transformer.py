"""Loading a diffusers transformer folder, and the errors for folders that are not usable."""
import json

import numpy as np
import pytest

from customshift_jax import StateDictMismatch, get_preset, load_transformer, params_from_state_dict
from customshift_jax.cli.main import main
from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
from customshift_jax.io.safetensors import SafetensorsFile, write_safetensors
from customshift_jax.models.mmdit.mapping import iter_torch_keys, state_dict_from_params

CONFIG = get_preset("tiny-sd3.5-medium")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_model():
    return random_diffusers_transformer(CONFIG, seed=11)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torch_model):
    folder = tmp_path_factory.mktemp("pipeline") / "transformer"
    torch_model.save_pretrained(folder)
    return folder


def _copy_with(saved, tmp_path, edit):
    """A copy of the saved folder whose tensors pass through `edit(dict) -> dict`."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    tensors = {k: np.array(v) for k, v in SafetensorsFile(saved / WEIGHTS).items()}
    write_safetensors(folder / WEIGHTS, edit(tensors))
    return folder


def test_load_folder_and_pipeline_folder(saved, torch_model):
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for path in (saved, saved.parent):  # the component folder, and the pipeline folder above it
        config, params = load_transformer(path)
        assert config == CONFIG
        loaded = state_dict_from_params(config, params)
        assert set(loaded) == set(expected)
        for key, value in loaded.items():
            np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_state_dict_round_trip_is_bit_exact(torch_model):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    back = state_dict_from_params(CONFIG, params_from_state_dict(CONFIG, sd))
    assert list(back) == sorted(sd, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    for k, v in sd.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    assert set(iter_torch_keys(CONFIG)) == set(sd)


def test_scanned_groups_are_stacked(torch_model):
    params = params_from_state_dict(CONFIG, torch_model.state_dict())
    groups = params["transformer_blocks"]
    assert sorted(groups) == ["0:2", "2:3", "3:4"]
    assert groups["0:2"]["scan"]["attn"]["to_q"]["kernel"].shape == (2, 16, 16)
    assert "attn2" in groups["0:2"]["scan"] and "attn2" not in groups["2:3"]["scan"]
    assert "to_add_out" not in groups["3:4"]["scan"]["attn"]  # context_pre_only


def test_mapping_names_missing_unexpected_and_misshaped_keys(torch_model):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    sd.pop("transformer_blocks.1.attn.to_k.weight")
    sd["transformer_blocks.1.attn.to_kk.weight"] = np.zeros((16, 16), np.float32)
    sd["proj_out.weight"] = np.zeros((3, 16), np.float32)
    with pytest.raises(StateDictMismatch) as info:
        params_from_state_dict(CONFIG, sd)
    msg = str(info.value)
    assert "1 missing: transformer_blocks.1.attn.to_k.weight" in msg
    assert "1 unexpected: transformer_blocks.1.attn.to_kk.weight" in msg
    assert "proj_out.weight (3, 16) (expected (64, 16))" in msg
    assert "4 layers" in msg  # names the architecture it expected


def _crosscheck(folder, capsys):
    code = main(["crosscheck", "--torch", str(folder)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def test_crosscheck_a_saved_folder_passes(saved, capsys):
    code = main(["crosscheck", "--torch", str(saved), "--batch", "2", "--height", "8", "--width", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out


def test_crosscheck_missing_tensor(saved, tmp_path, capsys):
    folder = _copy_with(saved, tmp_path, lambda t: {k: v for k, v in t.items() if k != "norm_out.linear.bias"})
    code, err = _crosscheck(folder, capsys)
    assert code != 0 and "missing: norm_out.linear.bias" in err


def test_crosscheck_wrong_shape(saved, tmp_path, capsys):
    def edit(t):
        t["context_embedder.weight"] = np.zeros((16, 31), np.float32)
        return t
    code, err = _crosscheck(_copy_with(saved, tmp_path, edit), capsys)
    assert code != 0 and "context_embedder.weight (16, 31) (expected (16, 32))" in err


def test_crosscheck_config_not_json(saved, tmp_path, capsys):
    folder = _copy_with(saved, tmp_path, lambda t: t)
    (folder / "config.json").write_text("{not json")
    code, err = _crosscheck(folder, capsys)
    assert code != 0 and "config.json: not valid JSON" in err


def test_crosscheck_truncated_weights_and_missing_folder(saved, tmp_path, capsys):
    folder = _copy_with(saved, tmp_path, lambda t: t)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    code, err = _crosscheck(folder, capsys)
    assert code != 0 and "truncated" in err and WEIGHTS in err
    code, err = _crosscheck(tmp_path / "nowhere", capsys)
    assert code != 0 and "no such file or folder" in err


def test_config_json_fields_and_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG.to_diffusers_config(), "_class_name": "SD3Transformer2DModel"}))
    from customshift_jax import MMDiTConfig

    assert MMDiTConfig.from_json(path) == CONFIG
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig.from_diffusers_config({**CONFIG.to_diffusers_config(), "qk_norm": "layer_norm"})
