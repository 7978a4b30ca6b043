"""Nothing silent, nothing lost (issue 15): content hashes of checkpoint pieces and LoRA files, config.json checked
against the stored shapes, a damaged marker named, stale temporary folders of killed runs removed (ours only),
interrupts that clean up, and --overwrite that never deletes files we did not write."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from customshift_jax.cli.main import main
from customshift_jax.io import convert as convert_module
from customshift_jax.io import export as export_module
from customshift_jax.io.checkpoint import MARKER, load_checkpoint
from customshift_jax.io.config_check import ConfigMismatch, check_exported_file
from customshift_jax.io.diffusers_folder import WEIGHTS_NAME
from customshift_jax.io.integrity import DamagedCheckpoint
from customshift_jax.io.leftovers import OWNER_FILE, sweep_stale
from customshift_jax.io.lora_files import (
    CGB_FILE,
    RAB_PREFIX,
    expected_state_dict_shapes,
    load_lora_files,
    save_lora_files,
)
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.testing import build_tiny_pipeline

LEAF = ("context_embedder", "kernel")  # (joint_attention_dim, hidden): a leaf whose bytes we find on disk


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny qk-norm SD3 pipeline folder (no text encoders), its conversion, and a CustomShift LoRA folder."""
    root = tmp_path_factory.mktemp("integrity")
    pipe = build_tiny_pipeline(root / "pipe", with_text_encoders=False, transformer_config={"qk_norm": "rms_norm"})
    assert main(["convert", str(pipe), str(root / "ckpt"), "--no-progress"]) == 0
    config, _ = load_checkpoint(root / "ckpt", ["transformer"])["transformer"]
    lora = LoRAConfig(rank=2, alpha=2.0)
    shapes = {**expected_state_dict_shapes(config, lora, "cgb"),
              **expected_state_dict_shapes(config, lora, "rab", prefix=RAB_PREFIX)}
    rng = np.random.default_rng(0)
    save_lora_files(root / "lora", {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, lora)
    return root


def _copy(made, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(made / "ckpt", dst)
    return dst


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def _flip_a_byte_of(ckpt, leaf: np.ndarray) -> str:
    """Flip one byte inside the stored bytes of `leaf` in the transformer's params; returns the piece's name."""
    needle = np.ascontiguousarray(leaf).tobytes()
    for path in sorted((ckpt / "transformer" / "params").rglob("*")):
        if path.is_file() and (at := path.read_bytes().find(needle)) >= 0:
            data = bytearray(path.read_bytes())
            data[at + len(needle) // 2] ^= 0x40
            path.write_bytes(bytes(data))
            return path.relative_to(ckpt / "transformer" / "params").parts[0]
    raise AssertionError("the leaf's bytes are not stored as they are")


def test_a_flipped_byte_is_refused_naming_the_piece_and_loads_without_verify(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    good = load_checkpoint(ckpt, ["transformer"])["transformer"][1]
    piece = _flip_a_byte_of(ckpt, good[LEAF[0]][LEAF[1]])
    with pytest.raises(DamagedCheckpoint) as info:
        load_checkpoint(ckpt, ["transformer"])
    message = str(info.value)
    assert f"params piece {ckpt / 'transformer' / 'params' / piece} is damaged" in message
    assert message.count("sha256:") == 2 and "re-run `customshift convert`" in message and "\n" not in message
    damaged = load_checkpoint(ckpt, ["transformer"], verify=False)["transformer"][1]
    assert not np.array_equal(damaged[LEAF[0]][LEAF[1]], good[LEAF[0]][LEAF[1]])
    # The CLI: refused in one line, and --no-verify is the escape.
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--components", "transformer"]) == 2
    assert piece in _one_line_error(capsys) and not (tmp_path / "out").exists()
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--components", "transformer", "--no-verify"]) == 0


def _as_version_2(marker: dict, keep_piece_hashes: bool = False) -> dict:
    """The marker as a version-2 writer left it: no marker or config hashes (and, before them, no piece hashes)."""
    marker = {**{k: v for k, v in marker.items() if k != "marker_hash"}, "version": 2}
    for entry in marker["components"].values():
        del entry["config_hash"]
        if not keep_piece_hashes:
            del entry["hashes"]
    return marker


def test_a_checkpoint_without_hashes_loads_with_a_warning(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    marker = _as_version_2(json.loads((ckpt / MARKER).read_text()))
    (ckpt / MARKER).write_text(json.dumps(marker))
    load_checkpoint(ckpt, ["transformer"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "no content hashes" in err and "\n" not in err


@pytest.mark.parametrize("fields, message", [
    ({"num_attention_heads": 4, "attention_head_dim": 4},
     "config.json says num_attention_heads=4 x attention_head_dim=4 but norm_q scale has 8 entries"),
    ({"joint_attention_dim": 48}, "config.json says joint_attention_dim=48 but the context_embedder kernel is"),
    ({"num_layers": 2}, "config.json says num_layers=2 but 3 transformer blocks are stored"),
    ({"pooled_projection_dim": 7}, "config.json says pooled_projection_dim=7 but"),
    ({"pos_embed_max_size": 8}, "config.json says pos_embed_max_size=8"),
])
def test_a_config_that_does_not_fit_the_arrays_is_refused_naming_the_field(made, tmp_path, fields, message):
    ckpt = _copy(made, tmp_path)
    config_file = ckpt / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    with pytest.raises(ConfigMismatch, match="config.json does not fit the stored weights") as info:
        load_checkpoint(ckpt, ["transformer"], verify=False)
    assert message in str(info.value) and str(config_file) in str(info.value)


def test_a_vae_config_that_does_not_fit_is_refused(made, tmp_path):
    ckpt = _copy(made, tmp_path)
    config_file = ckpt / "vae" / "config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "latent_channels": 8}))
    with pytest.raises(ConfigMismatch, match="of another shape"):  # the shape check, under the config's hash
        load_checkpoint(ckpt, ["vae"], verify=False)


def test_the_export_header_check_catches_a_config_diffusers_would_not_load(made, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(made / "ckpt"), str(out), "--components", "transformer"]) == 0
    config = json.loads((out / "transformer" / "config.json").read_text())
    check_exported_file(out / "transformer", WEIGHTS_NAME, "SD3Transformer2DModel", config)  # what export did
    with pytest.raises(ConfigMismatch, match=r"context_embedder\.weight is \(16, 96\) \(config.json implies \(16, 48\)"):
        check_exported_file(out / "transformer", WEIGHTS_NAME, "SD3Transformer2DModel",
                            {**config, "joint_attention_dim": 48})


def test_a_truncated_marker_is_named_damaged_by_load_and_by_convert_overwrite(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    text = (ckpt / MARKER).read_text()
    (ckpt / MARKER).write_text(text[: len(text) // 2])
    with pytest.raises(DamagedCheckpoint, match=f"the checkpoint marker {ckpt / MARKER} is damaged \\(not JSON"):
        load_checkpoint(ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "is damaged (not JSON" in _one_line_error(capsys)
    assert main(["convert", str(made / "pipe"), str(ckpt), "--overwrite", "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "is damaged (not JSON" in err and "missing" not in err
    assert (ckpt / MARKER).read_text() == text[: len(text) // 2]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partial_folders_of_killed_runs_are_reported_and_removed_ours_only(made, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    stale = tmp_path / f".{dst.name}.partial-0badf00d"  # what a SIGKILLed convert leaves
    shutil.copytree(made / "ckpt" / "transformer", stale / "transformer")
    (stale / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "dst": str(dst)}))
    size_mb = sum(p.stat().st_size for p in stale.rglob("*") if p.is_file()) / 1e6
    alive = tmp_path / f".{dst.name}.partial-1234abcd"  # a run still going (this process)
    alive.mkdir()
    (alive / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    foreign = tmp_path / f".{dst.name}.partial-notours"  # the name pattern, but not our marker
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    assert main(["convert", str(made / "pipe"), str(dst), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale} ({size_mb:.1f} MB), left by an interrupted run" in err
    assert not stale.exists() and alive.is_dir() and (foreign / "mine.txt").read_text() == "keep"
    assert not (dst / OWNER_FILE).exists()
    load_checkpoint(dst)


def test_a_stale_replaced_folder_is_removed_only_once_its_destination_is_back(tmp_path):
    dst = tmp_path / "ckpt"
    old = tmp_path / f".{dst.name}.replaced-0badf00d"  # an --overwrite killed between its two renames
    old.mkdir()
    (old / MARKER).write_text("{}")
    (old / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    notes = []
    assert sweep_stale(dst, notes.append) == [] and old.is_dir()
    assert "rename it back" in notes[0] and str(dst) in notes[0]
    dst.mkdir()
    assert sweep_stale(dst, notes.append) == [old] and not old.exists()


def test_sigterm_during_convert_removes_the_partial_folder(made, tmp_path, capsys, monkeypatch):
    calls = []
    release = convert_module.release_pages

    def release_then_signal(array):  # the 3rd tensor read: SIGTERM arrives mid-conversion
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        release(array)

    monkeypatch.setattr(convert_module, "release_pages", release_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["convert", str(made / "pipe"), str(tmp_path / "ckpt"), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"interrupted; removed partial {tmp_path}/.ckpt.partial-") and "\n" not in err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_sigint_during_export_removes_the_partial_folder(made, tmp_path, capsys, monkeypatch):
    check = export_module.check_exported_file

    def check_then_signal(*args):
        check(*args)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(export_module, "check_exported_file", check_then_signal)
    assert main(["export", str(made / "ckpt"), str(tmp_path / "out"), "--components", "transformer"]) == 130
    assert capsys.readouterr().err.strip().startswith(f"interrupted; removed partial {tmp_path}/.out.partial-")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_checkpoint_holding_foreign_files(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    for name in ("0.png", "1.png", "2.png", "notes.txt", "transformer/extra.json", "a.png", "b.png"):
        (ckpt / name).write_text("not ours")
    assert main(["convert", str(made / "pipe"), str(ckpt), "--overwrite", "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "holds files that are not part of it (0.png, 1.png, 2.png, a.png, b.png and 2 more)" in err
    assert (ckpt / "notes.txt").read_text() == "not ours"
    for name in ("0.png", "1.png", "2.png", "a.png", "b.png", "transformer/extra.json"):
        (ckpt / name).unlink()
    assert main(["convert", str(made / "pipe"), str(ckpt), "--overwrite", "--no-progress"]) == 2
    assert "(notes.txt)" in _one_line_error(capsys)
    (ckpt / "notes.txt").unlink()
    assert main(["convert", str(made / "pipe"), str(ckpt), "--overwrite", "--no-progress"]) == 0


def test_a_damaged_lora_file_in_an_export_is_detected_by_its_hash(made, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(made / "ckpt"), str(out), "--lora", str(made / "lora")]) == 0
    marker = json.loads((out / "customshift_export.json").read_text())
    assert marker["hashes"][f"lora/{CGB_FILE}"].startswith("sha256:")
    load_lora_files(out / "lora")
    data = bytearray((out / "lora" / CGB_FILE).read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    (out / "lora" / CGB_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=f"LoRA file {out / 'lora' / CGB_FILE} is damaged: its content hash"):
        load_lora_files(out / "lora")
    load_lora_files(out / "lora", verify=False)
    assert main(["export", str(made / "ckpt"), str(tmp_path / "again"), "--lora", str(out / "lora")]) == 2
    assert CGB_FILE in _one_line_error(capsys) and not (tmp_path / "again").exists()
    (out / "lora" / CGB_FILE).write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_lora_files(out / "lora")


def test_overwrite_refuses_an_export_holding_foreign_files(made, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(made / "ckpt"), str(out), "--components", "transformer"]) == 0
    (out / "render.png").write_text("not ours")
    assert main(["export", str(made / "ckpt"), str(out), "--components", "transformer", "--overwrite"]) == 2
    assert "(render.png)" in _one_line_error(capsys) and (out / "render.png").is_file()


# ------------------------------------------------- what the hashes cover (issue 26: cases 1, 2, 3, 5)

def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2))


@pytest.mark.parametrize("component, fields", [
    ("transformer", {"num_attention_heads": 4, "attention_head_dim": 4}),  # case 1: same shapes, other heads
    ("vae", {"scaling_factor": 4.5}),  # case 2: another latent scale, same arrays
])
def test_an_edited_config_is_refused_by_its_hash(made, tmp_path, capsys, component, fields):
    """Cases 1 and 2: an edited config.json that the arrays cannot contradict made other images, exit 0 (and
    `export` wrote that config); the marker now records each config's hash."""
    ckpt = _copy(made, tmp_path)
    config = ckpt / component / "config.json"
    _edit_json(config, **fields)
    with pytest.raises(DamagedCheckpoint, match=f"the {component} config {config} is damaged: its content hash"):
        load_checkpoint(ckpt, [component])
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--components", component]) == 2
    assert str(config) in _one_line_error(capsys) and not (tmp_path / "out").exists()


def test_an_edited_marker_is_refused(made, tmp_path, capsys):
    """Case 3: the marker's "hashes" renamed (and a piece damaged) gave only the old-checkpoint warning, exit 0."""
    ckpt = _copy(made, tmp_path)
    marker = json.loads((ckpt / MARKER).read_text())
    _flip_a_byte_of(ckpt, load_checkpoint(ckpt, ["transformer"])["transformer"][1][LEAF[0]][LEAF[1]])
    entry = marker["components"]["transformer"]
    entry["hashez"] = entry.pop("hashes")
    (ckpt / MARKER).write_text(json.dumps(marker))
    with pytest.raises(DamagedCheckpoint, match=f"the checkpoint marker {ckpt / MARKER} is damaged"):
        load_checkpoint(ckpt, ["transformer"])
    del marker["marker_hash"]  # its own hash removed too: a version-3 marker must have it
    (ckpt / MARKER).write_text(json.dumps(marker))
    with pytest.raises(DamagedCheckpoint, match="lacks its 'marker_hash'"):
        load_checkpoint(ckpt, ["transformer"])
    # Made to look like version 2 (no marker or config hashes), the renamed key is still seen.
    old = _as_version_2(json.loads((made / "ckpt" / MARKER).read_text()), keep_piece_hashes=True)
    entry = old["components"]["transformer"]
    entry["hashez"] = entry.pop("hashes")
    (ckpt / MARKER).write_text(json.dumps(old))
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--components", "transformer"]) == 2
    line = _one_line_error(capsys)
    assert "lacks the transformer's 'hashes' (the entry has 'hashez' in its place)" in line, line
    marker = json.loads((made / "ckpt" / MARKER).read_text())  # any other field edited: the marker's own hash
    marker["components"]["vae"]["params"] = "transformer/params"
    (ckpt / MARKER).write_text(json.dumps(marker))
    with pytest.raises(DamagedCheckpoint, match="checkpoint marker .* is damaged"):
        load_checkpoint(ckpt, ["vae"])


def test_a_version_2_checkpoint_with_piece_hashes_says_its_config_is_unverified(made, tmp_path, capsys):
    ckpt = _copy(made, tmp_path)
    (ckpt / MARKER).write_text(json.dumps(_as_version_2(json.loads((ckpt / MARKER).read_text()), True)))
    load_checkpoint(ckpt, ["vae"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "config.json carries no content hash" in err and "\n" not in err


def _rewrite_lora_metadata(path, update_ours):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    ours = json.loads(metadata["customshift_lora"])
    metadata["customshift_lora"] = json.dumps(update_ours(ours))
    save_file(tensors, str(path), metadata=metadata)


def test_lora_metadata_is_covered_by_the_files_hash(made, tmp_path, capsys):
    """Case 5: alpha x50 in the metadata (tensors unchanged) gave other pixels, exit 0; now refused, through the
    CLI too. A file written before the metadata was covered loads with a warning saying so."""
    lora = tmp_path / "lora"
    shutil.copytree(made / "lora", lora)
    _rewrite_lora_metadata(lora / CGB_FILE, lambda ours: {**ours, "alpha": ours["alpha"] * 50})
    with pytest.raises(DamagedCheckpoint, match=f"LoRA file {lora / CGB_FILE} is damaged: .*metadata"):
        load_lora_files(lora)
    assert main(["export", str(made / "ckpt"), str(tmp_path / "out"), "--lora", str(lora)]) == 2
    assert CGB_FILE in _one_line_error(capsys) and not (tmp_path / "out").exists()
    shutil.copyfile(made / "lora" / CGB_FILE, lora / CGB_FILE)
    _rewrite_lora_metadata(lora / CGB_FILE, lambda ours: {k: v for k, v in ours.items() if k != "file_hash"})
    load_lora_files(lora)
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "(rank, alpha) carries no content hash" in err and "\n" not in err
