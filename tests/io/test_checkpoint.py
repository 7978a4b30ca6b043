"""customshift_jax.io.checkpoint: the orbax checkpoint format, its atomic writes and its loaders."""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from customshift_jax import get_preset, load_transformer, param_shapes
from customshift_jax.io.checkpoint import (
    MARKER,
    CheckpointExists,
    checkpoint_components,
    is_checkpoint,
    iter_leaves,
    load_checkpoint,
    nest_leaves,
    save_checkpoint,
)
from customshift_jax.models.vae import VAEConfig
from customshift_jax.models.vae.model import param_shapes as vae_param_shapes

CONFIG = get_preset("tiny-sd3.5-medium")  # scanned groups named "0:2", "2:3", "3:4"


@pytest.fixture(scope="module")
def params():
    """Random params of CONFIG's shapes (shapes traced abstractly: no model init to compile)."""
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), param_shapes(CONFIG))


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
        for (_, x), (_, y) in zip(la, lb))


def test_round_trip_fp32_and_bf16_with_two_components(params, tmp_path):
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    vae_config = VAEConfig.tiny()
    rng = np.random.default_rng(1)
    vae = {}
    for path, shape in vae_param_shapes(vae_config).items():
        node = vae
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = rng.standard_normal(shape).astype(np.float32)
    dst = save_checkpoint(tmp_path / "ckpt", {"transformer": (CONFIG, bf16), "vae": (vae_config, lambda: vae)},
                          metadata={"source": "test"})
    assert is_checkpoint(dst) and checkpoint_components(dst) == ["transformer", "vae"]
    marker = json.loads((dst / MARKER).read_text())
    assert marker["components"]["transformer"]["dtype"] == "bfloat16" and marker["source"] == "test"
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and config["dual_attention_layers"] == [0, 1]
    loaded = load_checkpoint(dst)
    assert loaded["transformer"][0] == CONFIG and _equal(loaded["transformer"][1], bf16)
    assert loaded["vae"][0] == vae_config and _equal(loaded["vae"][1], vae)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(loaded["transformer"][1]))
    # load_transformer reads our checkpoints too, casting on request.
    cfg, p32 = load_transformer(dst, dtype="fp32")
    assert cfg == CONFIG
    assert _equal(jax.tree_util.tree_map(np.asarray, p32),
                  jax.tree_util.tree_map(lambda a: a.astype(np.float32), bf16))
    # The params are plain orbax PyTrees (here one piece): orbax alone restores them.
    assert marker["components"]["transformer"]["pieces"] == ["part-00000"]
    assert _equal(_restore_plain(dst / "transformer" / "params" / "part-00000"), bf16)


def _restore_plain(path):
    """A PyTree restored by orbax alone, as numpy."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        return jax.tree_util.tree_map(np.asarray, ckptr.restore(path.absolute()))


def test_params_written_in_pieces_read_back_equal(params, tmp_path):
    # A piece closes once it holds piece_bytes: 4 KiB splits the tiny model into many pieces.
    leaves = list(iter_leaves(params))
    dst = save_checkpoint(tmp_path / "ckpt", {"transformer": (CONFIG, lambda: iter(leaves))}, piece_bytes=4096)
    entry = json.loads((dst / MARKER).read_text())["components"]["transformer"]
    assert entry["dtype"] == "float32"
    assert entry["num_params"] == sum(a.size for _, a in leaves)
    pieces = entry["pieces"]
    assert len(pieces) > 3 and sorted(p.name for p in (dst / "transformer" / "params").iterdir()) == pieces
    assert _equal(load_checkpoint(dst)["transformer"][1], params)
    # Each piece is a plain orbax PyTree of some leaves; together they are all the leaves, once each.
    merged = {}
    for piece in pieces:
        nest_leaves(iter_leaves(_restore_plain(dst / "transformer" / "params" / piece)), into=merged)
    assert _equal(merged, params)
    # A missing piece is named.
    shutil.rmtree(dst / "transformer" / "params" / pieces[1])
    with pytest.raises(FileNotFoundError, match=f"{pieces[1]}: the transformer params are missing"):
        load_checkpoint(dst)


def test_version_1_checkpoints_with_one_params_pytree_still_load(params, tmp_path):
    # Version 1 wrote each component's params as one orbax PyTree in <component>/params/, no "pieces".
    import orbax.checkpoint as ocp

    dst = tmp_path / "v1"
    (dst / "transformer").mkdir(parents=True)
    (dst / "transformer" / "config.json").write_text(json.dumps(CONFIG.to_diffusers_config()))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((dst / "transformer" / "params").absolute(), params)
    entry = {"class": "SD3Transformer2DModel", "config": "transformer/config.json", "params": "transformer/params",
             "dtype": "float32", "num_params": 0}
    (dst / MARKER).write_text(json.dumps({"format": "customshift-jax-checkpoint", "version": 1,
                                          "components": {"transformer": entry}}))
    config, loaded = load_checkpoint(dst)["transformer"]
    assert config == CONFIG and _equal(loaded, params)
    assert _equal(jax.tree_util.tree_map(np.asarray, load_transformer(dst)[1]), params)


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(params, tmp_path):
    def broken():
        raise ValueError("conversion failed half way")

    with pytest.raises(ValueError, match="half way"):
        save_checkpoint(tmp_path / "new", {"transformer": (CONFIG, params), "vae": (VAEConfig.tiny(), broken)})
    assert list(tmp_path.iterdir()) == []
    dst = save_checkpoint(tmp_path / "ckpt", {"transformer": (CONFIG, params)})
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    with pytest.raises(ValueError, match="half way"):
        save_checkpoint(dst, {"transformer": (CONFIG, broken)}, overwrite=True)
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert _equal(load_checkpoint(dst)["transformer"][1], params)


def test_existing_destinations(params, tmp_path):
    dst = save_checkpoint(tmp_path / "ckpt", {"transformer": (CONFIG, params)})
    with pytest.raises(CheckpointExists, match="already exists"):
        save_checkpoint(dst, {"transformer": (CONFIG, params)})
    half = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), params)
    save_checkpoint(dst, {"transformer": (CONFIG, half)}, overwrite=True)
    assert _equal(load_checkpoint(dst)["transformer"][1], half)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointExists, match="not a customshift checkpoint"):
        save_checkpoint(other, {"transformer": (CONFIG, params)}, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, {"transformer": (CONFIG, params)})  # an empty directory needs no overwrite
    assert is_checkpoint(empty)


def test_load_errors_name_the_problem(params, tmp_path):
    with pytest.raises(ValueError, match="is not a customshift checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent")
    dst = save_checkpoint(tmp_path / "ckpt", {"transformer": (CONFIG, params)})
    with pytest.raises(ValueError, match="no vae in this checkpoint; it holds transformer"):
        load_checkpoint(dst, ["vae"])
