"""Training checkpoints keep the state under its parameter paths, and those written before (leaves under
"00000", "00001", ...) still resume."""
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

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
    mngr = loop._manager(tmp_path / "checkpoints", 3, False)
    loop._save(mngr, 4, state, it, seed=0)
    mngr.wait_until_finished()
    assert set(loop._stored_state(mngr, 4)) == {"step", "trainable", "opt_state"}
    fresh = FakeIterator()
    restored, step = loop._restore(mngr, _state(0.0), fresh, seed=0)
    mngr.close()
    assert step == 4 and fresh.position == {"epoch": 2, "index": 9}
    _leaves_equal(restored, state)
    saved = loop.final_trainable(tmp_path)
    assert "state/trainable/cgb/transformer_blocks/0:2/scan/attn/beta" in saved
    assert "state/opt_state/0/mu/transformer_blocks/0:2/scan/attn/to_q/lora_A" in saved


def test_checkpoint_with_indexed_leaves_still_resumes(tmp_path):
    """The layout of earlier versions: one entry a leaf, named by its index in the state's leaf order."""
    state, it = _state(2.5), FakeIterator()
    mngr = loop._manager(tmp_path / "checkpoints", 3, False)
    flat = {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(state))}
    mngr.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                         meta=ocp.args.JsonSave({"data": it.state(), "seed": 0, "step": 6})),
              force=True)
    mngr.wait_until_finished()
    assert loop._is_indexed(mngr, 6)
    restored, step = loop._restore(mngr, _state(0.0), FakeIterator(), seed=0)
    mngr.close()
    assert step == 6
    _leaves_equal(restored, state)
