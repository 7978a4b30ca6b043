"""Our training-checkpoint format (beside `checkpoint.py`, the model format): orbax steps holding the train state
under its parameter paths (e.g. "trainable/cgb/transformer_blocks/0:2/scan/attn/beta"; older steps keep the
leaves by index, "00000", ...) and a JSON meta of the data position, seed and step. Restore takes the newest
readable step; a damaged one is set aside as `damaged-<step>`; a sound one of another seed is refused."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


def state_path(path) -> str:
    """A train-state leaf's parameter path, e.g. "trainable/cgb/transformer_blocks/0:2/scan/attn/beta"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat_state(state) -> dict:
    """{parameter path: leaf} in the state's leaf order: how a training checkpoint stores the state."""
    import jax

    return {state_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _nested(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: orbax stores the tree under its parameter paths."""
    out: dict = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = x
    return out


def _flatten_nested(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flatten_nested(v, path + "/") if isinstance(v, dict) else {path: v})
    return out


def open_train_checkpoints(directory: Path, keep: int, async_: bool):
    """The orbax CheckpointManager of a run's `checkpoints/` folder (created), keeping the newest `keep` steps."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_train_state(mngr, step: int, state, it, seed: int) -> None:
    """Save `state` under its parameter paths at `step`, with the data position (`it.state()`) and the seed."""
    import orbax.checkpoint as ocp

    meta = {"data": it.state(), "seed": seed, "step": step}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_nested(_flat_state(state))),
                                            meta=ocp.args.JsonSave(meta)), force=True)


class SeedMismatch(ValueError):
    """The checkpoint is sound but belongs to a run with another seed: no fallback, the user must fix the config."""


def restore_train_state(mngr, state, it, seed: int, log=print):
    """(state, step) from the newest readable checkpoint: params, optimizer state, data position (RNG is
    (seed, step)). A damaged step is set aside as `damaged-<step>` beside the others, and the next older one used."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return _restore_step(mngr, state, it, seed, step)
        except SeedMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore, orbax, JSON and shape errors all mean "unreadable"
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            aside = _set_aside(Path(mngr.directory), step)
            mngr.reload()
            log(f"warning: the checkpoint at step {step} cannot be read ({type(e).__name__}: {reason}); moved to "
                f"{aside}, falling back to the previous one")
    if steps:
        raise ValueError(f"no checkpoint in {mngr.directory} can be read (steps {steps}, now under damaged-*); "
                         "start again without --resume in a new output_dir.")
    return state, 0


def _set_aside(directory: Path, step: int) -> Path:
    """Rename the damaged step folder to the first free `damaged-<step>[-k]` (kept for inspection, never read)."""
    names = [f"damaged-{step}"] + [f"damaged-{step}-{k}" for k in range(2, 1000)]
    aside = next(directory / n for n in names if not (directory / n).exists())
    with contextlib.suppress(FileNotFoundError):  # another process of the job moved it first
        os.rename(directory / str(step), aside)
    return aside


def _restore_step(mngr, state, it, seed: int, step: int):
    """(state, step) from the checkpoint at `step`; raises whatever orbax raises for a damaged one."""
    import jax
    import orbax.checkpoint as ocp

    flat = _flat_state(state)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                for k, v in flat.items()}
    by_index = is_indexed(mngr, step)  # a checkpoint of before parameter paths: leaves under "00000", ...
    target = {f"{i:05d}": a for i, a in enumerate(abstract.values())} if by_index else _nested(abstract)
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    meta = got["meta"]
    if meta["seed"] != seed:
        raise SeedMismatch(f"the checkpoint at step {step} was trained with seed {meta['seed']}, this config has "
                         f"train.seed={seed}; resume with the same seed.")
    saved = got["state"] if by_index else _flatten_nested(got["state"])
    leaves = [saved[k] for k in sorted(saved)] if by_index else [saved[k] for k in flat]
    it.restore(meta["data"])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves), step


def is_indexed(mngr, step: int) -> bool:
    """Whether the checkpoint at `step` keeps its leaves by index (written before parameter paths)."""
    names = list(stored_state(mngr, step))
    return bool(names) and all(n.isdigit() for n in names)


def stored_state(mngr, step: int) -> dict:
    """The top level of the saved state's tree (names -> metadata), read without loading arrays."""
    meta = mngr.item_metadata(step)
    state = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else getattr(meta, "state")
    return dict(getattr(state, "tree", state) or {})


def read_latest_train_state(directory: str | Path) -> dict[str, np.ndarray]:
    """The newest checkpoint in `directory` as numpy: {"step": its step, "state/<parameter path>": array}."""
    step, state = read_train_state(directory)
    return {"step": step, **{f"state/{k}": v for k, v in _flatten_nested(state).items()}}


def read_train_state(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, the train state as a nested dict of numpy arrays, e.g. state["ema"]) of the checkpoint at `step`
    in `directory` (None: the newest), read without the run's code or config."""
    import orbax.checkpoint as ocp

    mngr = open_train_checkpoints(Path(directory), 100, False)
    try:
        if step is None:
            step = mngr.latest_step()
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint of step {step} (there are {list(mngr.all_steps())}).")
        got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
        return step, _nested({k: np.asarray(v) for k, v in _flatten_nested(got["state"]).items()})
    finally:
        mngr.close()


def train_steps(directory: str | Path) -> list[int]:
    """The steps of the checkpoints in `directory`, oldest first."""
    mngr = open_train_checkpoints(Path(directory), 100, False)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()
