"""Training checkpoints keep the state under its parameter paths, and those written before (leaves under
"00000", "00001", ...) still resume."""
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from customshift_jax.io import train_state
from customshift_jax.train import loop


class AdamLike(NamedTuple):
    count: np.ndarray
    mu: dict
    nu: dict


class FakeIterator:
    """The data position a checkpoint stores beside the state."""

    def __init__(self):
        self.position = {"epoch": 0, "index": 0}

    def state(self):
        return dict(self.position)

    def restore(self, position):
        self.position = dict(position)


def _state(scale: float) -> dict:
    lora = {"transformer_blocks": {"0:2": {"scan": {"attn": {"to_q": {"lora_A": np.full((2, 4, 3), scale, np.float32)},
                                                         "beta": np.arange(2 * 4, dtype=np.float32).reshape(2, 4)}}}}}
    mu = jax.tree_util.tree_map(lambda a: a * 0.5, lora)
    return {"step": np.int32(7), "trainable": {"cgb": lora},
            "opt_state": (AdamLike(np.int32(3), mu, jax.tree_util.tree_map(lambda a: a * 0.25, lora)),)}


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_stores_parameter_paths_and_resumes(tmp_path):
    state, it = _state(1.5), FakeIterator()
    it.position = {"epoch": 2, "index": 9}
    mngr = train_state.open_train_checkpoints(tmp_path / "checkpoints", 3, False)
    train_state.save_train_state(mngr, 4, state, it, seed=0)
    mngr.wait_until_finished()
    assert set(train_state.stored_state(mngr, 4)) == {"step", "trainable", "opt_state"}
    fresh = FakeIterator()
    restored, step = train_state.restore_train_state(mngr, _state(0.0), fresh, seed=0)
    mngr.close()
    assert step == 4 and fresh.position == {"epoch": 2, "index": 9}
    _leaves_equal(restored, state)
    saved = loop.final_trainable(tmp_path)
    assert "state/trainable/cgb/transformer_blocks/0:2/scan/attn/beta" in saved
    assert "state/opt_state/0/mu/transformer_blocks/0:2/scan/attn/to_q/lora_A" in saved


def test_checkpoint_with_indexed_leaves_still_resumes(tmp_path):
    """The layout of earlier versions: one entry a leaf, named by its index in the state's leaf order."""
    state, it = _state(2.5), FakeIterator()
    mngr = train_state.open_train_checkpoints(tmp_path / "checkpoints", 3, False)
    flat = {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(state))}
    mngr.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                         meta=ocp.args.JsonSave({"data": it.state(), "seed": 0, "step": 6})),
              force=True)
    mngr.wait_until_finished()
    assert train_state.is_indexed(mngr, 6)
    restored, step = train_state.restore_train_state(mngr, _state(0.0), FakeIterator(), seed=0)
    mngr.close()
    assert step == 6
    _leaves_equal(restored, state)


def _damage(step_dir):
    """Overwrite every stored array file of a step with garbage of the same size (a disk that went bad)."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size and f.name not in ("_METADATA", "_CHECKPOINT_METADATA"):
            f.write_bytes(b"\x5a" * f.stat().st_size)


def test_damaged_latest_step_falls_back_to_the_newest_good_one(tmp_path):
    """`train --resume` with a damaged latest checkpoint resumes from the one before, sets the damaged one aside
    (so the run can save that step again) and says so; with none readable it stops with one line."""
    mngr = train_state.open_train_checkpoints(tmp_path / "checkpoints", 3, False)
    for step, scale in ((2, 1.0), (4, 2.0)):
        it = FakeIterator()
        it.position = {"epoch": 0, "index": step}
        train_state.save_train_state(mngr, step, _state(scale), it, seed=0)
    mngr.wait_until_finished()
    _damage(tmp_path / "checkpoints" / "4")
    said, fresh = [], FakeIterator()
    restored, step = train_state.restore_train_state(mngr, _state(0.0), fresh, seed=0, log=said.append)
    assert step == 2 and fresh.position == {"epoch": 0, "index": 2}
    _leaves_equal(restored, _state(1.0))
    assert len(said) == 1 and "step 4 cannot be read" in said[0] and "damaged-4" in said[0], said
    assert (tmp_path / "checkpoints" / "damaged-4").is_dir() and mngr.all_steps() == [2]
    train_state.save_train_state(mngr, 4, _state(3.0), FakeIterator(), seed=0)  # the resumed run saves step 4 again
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 4]
    _damage(tmp_path / "checkpoints" / "4")
    _damage(tmp_path / "checkpoints" / "2")
    with pytest.raises(ValueError, match="no checkpoint .* can be read"):
        train_state.restore_train_state(mngr, _state(0.0), FakeIterator(), seed=0, log=said.append)
    mngr.close()


def test_seed_mismatch_is_not_taken_for_damage(tmp_path):
    """A sound checkpoint of another seed is the user's config error: refused, and nothing is set aside."""
    mngr = train_state.open_train_checkpoints(tmp_path / "checkpoints", 3, False)
    train_state.save_train_state(mngr, 2, _state(1.0), FakeIterator(), seed=0)
    mngr.wait_until_finished()
    with pytest.raises(ValueError, match="seed"):
        train_state.restore_train_state(mngr, _state(0.0), FakeIterator(), seed=1)
    mngr.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
