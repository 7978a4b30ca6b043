"""Refusals of `customshift convert` / `export`: non-zero exit, one paragraph naming what is wrong and what
was expected, no traceback, and DST exactly as it was (absent, or the earlier checkpoint)."""
import hashlib
import json

import numpy as np
import pytest

from customshift_jax import get_preset
from customshift_jax.cli.main import main
from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
from customshift_jax.io.safetensors import write_safetensors
from customshift_jax.io.single_file import TRANSFORMER_PREFIX, transformer_to_original

QKV = f"{TRANSFORMER_PREFIX}joint_blocks.1.x_block.attn.qkv.weight"
PROJ = f"{TRANSFORMER_PREFIX}joint_blocks.1.x_block.attn.proj.weight"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny-sd3.5-large diffusers folder, its original single-file tensors, and a good checkpoint."""
    root = tmp_path_factory.mktemp("errors")
    config = get_preset("tiny-sd3.5-large")  # qk norm: the architecture is inferable from the file alone
    model = random_diffusers_transformer(config, seed=1)
    model.save_pretrained(root / "transformer")
    original = {TRANSFORMER_PREFIX + k: v for k, v in transformer_to_original(config, model.state_dict()).items()}
    write_safetensors(root / "good.safetensors", original)
    assert main(["convert", str(root / "good.safetensors"), str(root / "existing"), "--no-progress"]) == 0
    return root, original


def _snapshot(path):
    """Every file under `path` with its content hash (None if absent)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def _refused(argv, dst, capsys) -> str:
    """Run the CLI expecting a refusal; check exit code, one paragraph, no traceback, DST and its folder intact."""
    before, siblings = _snapshot(dst), sorted(p.name for p in dst.parent.iterdir())
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert _snapshot(dst) == before, "DST changed"
    assert sorted(p.name for p in dst.parent.iterdir()) == siblings, "a temporary folder was left behind"
    return err


def _write_variant(root, name, tensors):
    path = root / f"{name}.safetensors"
    write_safetensors(path, tensors)
    return path


def test_truncated_safetensors(sources, capsys):
    root, _ = sources
    data = (root / "good.safetensors").read_bytes()
    bad = root / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    err = _refused(["convert", str(bad), str(root / "out_truncated")], root / "out_truncated", capsys)
    assert "truncated" in err and str(bad) in err


def test_missing_key(sources, capsys):
    root, original = sources
    path = _write_variant(root, "missing", {k: v for k, v in original.items() if k != PROJ})
    err = _refused(["convert", str(path), str(root / "out_missing")], root / "out_missing", capsys)
    assert f"1 missing: {PROJ}." in err
    assert "expected MMDiT with 3 layers, 2 heads x 8, qk_norm=rms_norm" in err


def test_renamed_key(sources, capsys):
    root, original = sources
    renamed = {(k.replace("attn.proj", "attn.projection") if k == PROJ else k): v for k, v in original.items()}
    path = _write_variant(root, "renamed", renamed)
    err = _refused(["convert", str(path), str(root / "out_renamed")], root / "out_renamed", capsys)
    assert f"1 missing: {PROJ}." in err
    assert f"1 unexpected: {PROJ.replace('attn.proj', 'attn.projection')}." in err


def test_wrong_shape(sources, capsys):
    root, original = sources
    bad = dict(original)
    bad[QKV] = np.zeros((original[QKV].shape[0] - 3, original[QKV].shape[1]), np.float32)
    path = _write_variant(root, "wrong_shape", bad)
    err = _refused(["convert", str(path), str(root / "out_shape")], root / "out_shape", capsys)
    assert f"1 wrong shape: {QKV} (45, 16) (expected (48, 16))." in err


def test_wrong_shape_in_a_diffusers_folder(sources, capsys, tmp_path):
    root, _ = sources
    import shutil

    from customshift_jax.io.safetensors import SafetensorsFile

    folder = tmp_path / "transformer"
    shutil.copytree(root / "transformer", folder)
    st = SafetensorsFile(folder / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    tensors["transformer_blocks.0.attn.to_q.weight"] = np.zeros((16, 8), np.float32)
    del tensors["proj_out.bias"]
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    err = _refused(["convert", str(folder), str(tmp_path / "out")], tmp_path / "out", capsys)
    assert "1 missing: proj_out.bias." in err
    assert "1 wrong shape: transformer_blocks.0.attn.to_q.weight (16, 8) (expected (16, 16))." in err


def test_many_mismatches_list_twenty_then_count(sources, capsys, tmp_path):
    # A tiny-sd3.5-large file read with the tiny-sd3.5-medium config: dual attention keys are missing.
    root, _ = sources
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "SD3Transformer2DModel",
                               **get_preset("tiny-sd3.5-medium").to_diffusers_config()}))
    err = _refused(["convert", str(root / "good.safetensors"), str(tmp_path / "out"), "--config", str(cfg)],
                   tmp_path / "out", capsys)
    assert "missing:" in err and "... and" in err and "more" in err
    assert "expected MMDiT with 4 layers" in err and "dual attention in [0, 1] layers" in err
    missing = err.split("missing: ")[1].split(".")[0]
    assert missing  # names keys, not just a count


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_unknown_architecture(kind, capsys, tmp_path):
    if kind == "file":
        src = tmp_path / "flux.safetensors"
        write_safetensors(src, {"double_blocks.0.img_attn.norm.key_norm.scale": np.ones(4, np.float32)})
    else:
        src = tmp_path / "flux_transformer"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 19}))
    err = _refused(["convert", str(src), str(tmp_path / "out")], tmp_path / "out", capsys)
    assert "unknown architecture" in err
    assert "SD3" in err


def test_uninferable_head_dim_asks_for_config(capsys, tmp_path):
    # tiny-sd3-medium has no qk norm and 8-wide heads: the file cannot say so; --config is the way.
    config = get_preset("tiny-sd3-medium")
    model = random_diffusers_transformer(config, seed=0)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {TRANSFORMER_PREFIX + k: v
                             for k, v in transformer_to_original(config, model.state_dict()).items()})
    err = _refused(["convert", str(path), str(tmp_path / "out")], tmp_path / "out", capsys)
    assert "Pass --config" in err and "head dim 64" in err


def test_existing_destination_without_overwrite(sources, capsys):
    root, _ = sources
    dst = root / "existing"
    err = _refused(["convert", str(root / "good.safetensors"), str(dst)], dst, capsys)
    assert "already exists" in err and "--overwrite" in err


def test_overwrite_keeps_destination_when_the_new_conversion_is_refused(sources, capsys):
    root, original = sources
    dst = root / "existing"
    path = _write_variant(root, "missing2", {k: v for k, v in original.items() if k != QKV})
    err = _refused(["convert", str(path), str(dst), "--overwrite"], dst, capsys)
    assert "1 missing" in err


def test_overwrite_replaces_a_checkpoint(sources, capsys, tmp_path):
    root, _ = sources
    dst = tmp_path / "ckpt"
    assert main(["convert", str(root / "good.safetensors"), str(dst), "--no-progress"]) == 0
    assert main(["convert", str(root / "transformer"), str(dst), "--dtype", "bf16", "--overwrite",
                 "--no-progress"]) == 0
    marker = json.loads((dst / "customshift_checkpoint.json").read_text())
    assert marker["components"]["transformer"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_never_replaces_a_folder_that_is_not_ours(sources, capsys, tmp_path):
    root, _ = sources
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    err = _refused(["convert", str(root / "good.safetensors"), str(dst), "--overwrite"], dst, capsys)
    assert "not a customshift checkpoint" in err


def test_config_is_refused_for_folders_and_unknown_components(sources, capsys, tmp_path):
    root, _ = sources
    err = _refused(["convert", str(root / "transformer"), str(tmp_path / "o"), "--config",
                    str(root / "transformer")], tmp_path / "o", capsys)
    assert "--config applies to single-file sources only" in err
    err = _refused(["convert", str(root / "good.safetensors"), str(tmp_path / "o"), "--components", "vae"],
                   tmp_path / "o", capsys)
    assert "has no vae" in err and "transformer" in err
    err = _refused(["convert", str(root / "good.safetensors"), str(tmp_path / "o"), "--components", "unet"],
                   tmp_path / "o", capsys)
    assert "unknown component(s) unet" in err


def test_export_refusals(sources, capsys, tmp_path):
    root, _ = sources
    err = _refused(["export", str(root / "transformer"), str(tmp_path / "o")], tmp_path / "o", capsys)
    assert "is not a customshift checkpoint" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    err = _refused(["export", str(root / "existing"), str(tmp_path / "taken")], tmp_path / "taken", capsys)
    assert "already exists" in err
