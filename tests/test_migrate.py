"""An older checkpoint (marker version 2, no content hashes) rewritten in the current format: the same params,
configs and beside-folders, every piece now hashed, and a damaged copy refused."""
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from customshift_jax.io.checkpoint import DamagedCheckpoint, load_checkpoint, read_marker
from customshift_jax.io.migrate import migrate_checkpoint

V2 = Path(__file__).resolve().parents[1] / "customshift_jax" / "toyworld" / "weights" / "model"


def _v2_copy(tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(V2, dst)
    marker = read_marker(dst)
    if marker["version"] >= 3:
        pytest.skip("the shipped model is already in the current format")
    return dst


def test_migrate_keeps_everything_and_adds_the_hashes(tmp_path, capsys):
    path = _v2_copy(tmp_path)
    before = load_checkpoint(path, verify=False)
    beside = sorted(p.name for p in path.iterdir())
    assert migrate_checkpoint(path) is True
    capsys.readouterr()
    after = load_checkpoint(path)
    assert "no content hash" not in capsys.readouterr().err  # nothing read unverified any more
    for name, (config, params) in before.items():
        assert after[name][0] == config
        for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(after[name][1])):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    assert sorted(p.name for p in path.iterdir()) == beside and not list(tmp_path.glob(".model.*"))
    assert read_marker(path).get("trained") == read_marker(V2).get("trained")
    assert migrate_checkpoint(path) is False


def test_a_damaged_piece_of_a_migrated_checkpoint_is_refused(tmp_path):
    path = _v2_copy(tmp_path)
    migrate_checkpoint(path)
    piece = max((p for p in (path / "transformer" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.write_bytes(bytes(data))
    with pytest.raises((DamagedCheckpoint, ValueError)):
        load_checkpoint(path)
