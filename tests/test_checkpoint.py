"""customshift_jax.checkpoint: the orbax checkpoint format, its atomic writes and its loaders."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from customshift_jax import get_preset, load_transformer, param_shapes
from customshift_jax.checkpoint import (
    MARKER,
    CheckpointExists,
    checkpoint_components,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from customshift_jax.vae import VAEConfig
from customshift_jax.vae.model import param_shapes as vae_param_shapes

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
    # The params are a plain orbax PyTree: orbax alone restores them.
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore((dst / "transformer" / "params").absolute())
    assert _equal(jax.tree_util.tree_map(np.asarray, restored), bf16)


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
