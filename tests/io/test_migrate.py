"""An older checkpoint (marker version 2, no content hashes) rewritten in the current format: the same params,
configs and beside-folders, every piece now hashed, and a damaged copy refused."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from customshift_jax.io.checkpoint import (
    CONFIG_HASH_KEY,
    FOLDERS_KEY,
    MARKER,
    MARKER_HASH_KEY,
    DamagedCheckpoint,
    load_checkpoint,
    read_marker,
)
from customshift_jax.io.integrity import HASHES_KEY
from customshift_jax.io.migrate import migrate_checkpoint

SHIPPED = Path(__file__).resolve().parents[2] / "customshift_jax" / "toyworld" / "weights" / "model"


def _v2_copy(tmp_path) -> Path:
    """The shipped world model as an older customshift-jax wrote it: marker version 2, no hashes anywhere."""
    dst = tmp_path / "model"
    shutil.copytree(SHIPPED, dst)
    marker = json.loads((dst / MARKER).read_text())
    marker["version"] = 2
    for key in (MARKER_HASH_KEY, FOLDERS_KEY):
        marker.pop(key, None)
    for entry in marker["components"].values():
        for key in (HASHES_KEY, CONFIG_HASH_KEY):
            entry.pop(key, None)
    (dst / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return dst


def test_migrate_keeps_everything_and_adds_the_hashes(tmp_path, capsys):
    path = _v2_copy(tmp_path)
    before = load_checkpoint(path)
    assert "no content hash" in capsys.readouterr().err  # an old checkpoint: read unverified
    beside = sorted(p.name for p in path.iterdir())
    assert migrate_checkpoint(path) is True
    after = load_checkpoint(path)
    assert "no content hash" not in capsys.readouterr().err  # nothing read unverified any more
    for name, (config, params) in before.items():
        assert after[name][0] == config
        for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(after[name][1])):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    assert sorted(p.name for p in path.iterdir()) == beside and not list(tmp_path.glob(".model.*"))
    assert read_marker(path).get("trained") == read_marker(SHIPPED).get("trained")
    assert read_marker(path).get("text_settings") == read_marker(SHIPPED).get("text_settings")
    assert migrate_checkpoint(path) is False


def test_a_damaged_piece_of_a_migrated_checkpoint_is_refused(tmp_path):
    path = _v2_copy(tmp_path)
    migrate_checkpoint(path)
    files = (p for p in (path / "transformer" / "params").rglob("*") if p.is_file())
    piece = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.write_bytes(bytes(data))
    with pytest.raises((DamagedCheckpoint, ValueError)):
        load_checkpoint(path)
