"""Our checkpoint format (DESIGN section 6): one directory, a marker JSON, and per component its diffusers
config JSON beside its params as orbax PyTrees. Writes are atomic: a checkpoint is complete or absent.

Layout (version 2)::

    DST/customshift_checkpoint.json   {"format": "customshift-jax-checkpoint", "version": 2, "components": {...}}
    DST/<component>/config.json       the diffusers config (`_class_name` included), e.g. SD3Transformer2DModel
    DST/<component>/params/part-NNNNN/  orbax PyTree checkpoints of numpy arrays, each restorable by plain
                                        orbax; each holds some of the leaves (same nested paths), together all

The marker's component entry lists its pieces ("pieces": ["part-00000", ...]); they are written one at a
time (about `PIECE_BYTES` each), so a writer holds one piece in memory, not the component. Version 1 (no
"pieces") stored the params as one orbax PyTree in DST/<component>/params/; it is still read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import jax
import numpy as np

from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.vae.config import VAEConfig

FORMAT = "customshift-jax-checkpoint"
VERSION = 2
MARKER = "customshift_checkpoint.json"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"
PIECES_KEY = "pieces"
PIECE_BYTES = 512 << 20  # one piece's leaves in memory at a time; a larger leaf is a piece of its own
Params = dict[str, Any]
Leaf = tuple[tuple[str, ...], Any]  # (path of dict keys, array)
ParamsSource = Union[Params, Callable[[], Union[Params, Iterable[Leaf]]]]


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    """A model component our checkpoints know: its diffusers class and how to read its config dict."""

    name: str
    diffusers_class: str
    config_from_dict: Callable[[Mapping[str, Any]], Any]


def _transformer_config(data: Mapping[str, Any]):
    return MMDiTConfig.from_diffusers_config(data)


def _vae_config(data: Mapping[str, Any]):
    return VAEConfig.from_diffusers_config(data)


# A new component (e.g. LoRA params) is one entry here; unknown names are stored and read back as raw dicts.
COMPONENT_KINDS: dict[str, ComponentKind] = {
    "transformer": ComponentKind("transformer", "SD3Transformer2DModel", _transformer_config),
    "vae": ComponentKind("vae", "AutoencoderKL", _vae_config),
}


class CheckpointExists(ValueError):
    """The destination exists and replacing it was not asked for (or is not safe)."""


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory holding our marker JSON with our format name."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, OSError, AttributeError):
        return False


def config_dict(name: str, config: Any) -> dict[str, Any]:
    """The diffusers config dict of a component's config (a dict, or an object with `to_diffusers_config`)."""
    data = dict(config.to_diffusers_config() if hasattr(config, "to_diffusers_config") else config)
    kind = COMPONENT_KINDS.get(name)
    if kind is not None:
        data = {"_class_name": kind.diffusers_class, **{k: v for k, v in data.items() if k != "_class_name"}}
    return data


def _registry():
    """orbax handlers that write host numpy arrays as they are: no defensive deep copy (it doubles memory)."""
    from orbax.checkpoint import type_handlers

    return type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()),
    )


def _checkpointer(restore_concurrent_gb: int = 2):
    import orbax.checkpoint as ocp

    # No compression: weights barely compress, zstd costs time and a compressed copy of each array in memory.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(), use_compression=False,
                                          restore_concurrent_gb=restore_concurrent_gb)
    return ocp.Checkpointer(handler)


def iter_leaves(params: Params) -> Iterator[Leaf]:
    """(path, numpy array) of every leaf of a nested dict of params, in jax's flattening order."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        yield tuple(str(k.key) for k in path), np.asarray(leaf)


def nest_leaves(leaves: Iterable[Leaf], into: Params | None = None) -> Params:
    """The nested dict of (path, array) leaves (added to `into` when given); a path given twice is an error."""
    tree: Params = {} if into is None else into
    for path, leaf in leaves:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if path[-1] in node:
            raise ValueError(f"param {'/'.join(path)} is given twice.")
        node[path[-1]] = leaf
    return tree


def _dtype_name(dtypes: Iterable[np.dtype]) -> str:
    names = sorted({np.dtype(d).name for d in dtypes})
    return names[0] if len(names) == 1 else "mixed:" + ",".join(names)


def _save_piece(ckptr: Any, directory: Path, pieces: list[str], piece: Params) -> None:
    """Write `piece` as the next plain orbax PyTree directory/part-NNNNN and name it in `pieces`."""
    import orbax.checkpoint as ocp

    pieces.append(f"part-{len(pieces):05d}")
    ckptr.save(directory / pieces[-1], args=ocp.args.PyTreeSave(piece))


def _write_params(directory: Path, leaves: Iterable[Leaf], piece_bytes: int) -> dict[str, Any]:
    """Write leaves as orbax PyTrees of about `piece_bytes` each, holding one piece at a time (a leaf is
    dropped once its piece is written); returns the marker fields: pieces, dtype, num_params."""
    directory.mkdir()
    pieces: list[str] = []
    dtypes, count = set(), 0
    piece: Params = {}
    size = 0
    with _checkpointer() as ckptr:
        for path, leaf in leaves:
            leaf = np.asarray(leaf)
            dtypes.add(leaf.dtype)
            count += leaf.size
            size += leaf.nbytes
            nest_leaves([(path, leaf)], into=piece)
            del leaf
            if size >= piece_bytes:
                _save_piece(ckptr, directory, pieces, piece)
                piece, size = {}, 0
        if piece:
            _save_piece(ckptr, directory, pieces, piece)
    return {PIECES_KEY: pieces, "dtype": _dtype_name(dtypes), "num_params": int(count)}


def check_destination(dst: str | Path, overwrite: bool, *, is_ours: Callable[[Path], bool] | None = None,
                      what: str = "new checkpoint", ours: str = f"a customshift checkpoint (no {MARKER})") -> None:
    """Refuse a destination we must not replace; say what to do instead (called again before the rename).

    `is_ours` recognises an earlier output of the same writer (default: our checkpoints), the only kind of
    non-empty directory that `overwrite` may replace; `what` and `ours` name them in the messages.
    """
    dst = Path(dst)
    is_ours = is_ours or is_checkpoint
    if not (dst.exists() or dst.is_symlink()):
        return
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return  # an empty directory: nothing to lose
    if not overwrite:
        raise CheckpointExists(f"{dst} already exists; pass --overwrite to replace it once the "
                               f"{what} is complete, or choose another destination.")
    if dst.is_symlink() or not dst.is_dir():
        raise CheckpointExists(f"{dst} exists and is not a directory; refusing to replace it, even with "
                               f"overwrite. Remove it yourself or choose another destination.")
    if not is_ours(dst):
        raise CheckpointExists(f"{dst} exists and is not {ours}; refusing to replace it, even with overwrite. "
                               f"Remove it yourself or choose another destination.")


@contextlib.contextmanager
def atomic_directory(dst: str | Path, check: Callable[[Path], None] = lambda d: None) -> Iterator[Path]:
    """Yield a new temporary directory beside `dst`; when the block succeeds, rename it to `dst`.

    `check(dst)` runs just before the rename and may refuse. An existing `dst` is moved aside, the new
    one renamed in, then the old one deleted; on any failure the temporary directory is removed and
    `dst` is left as it was.
    """
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check(dst)
        if dst.exists():
            old = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except OSError:
                os.rename(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    dst: str | Path,
    components: Mapping[str, tuple[Any, ParamsSource]],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    piece_bytes: int | None = None,
) -> Path:
    """Write {name: (config, params)} as one checkpoint at `dst`, atomically; returns `dst`.

    Everything is written into a temporary directory beside `dst` and renamed into place when complete.
    An existing `dst` is refused unless `overwrite`, and then replaced only after the new one is complete
    (only an earlier checkpoint of ours or an empty directory is ever replaced). Params are numpy/jax
    pytrees, written as they are (no copy), or zero-argument callables that build them, one component at
    a time. A callable may return an iterable of (path, array) leaves instead: the leaves are written in
    pieces of about `piece_bytes` (default `PIECE_BYTES`) as they come, so only one piece is in memory.
    `metadata` goes into the marker JSON.
    """
    dst = Path(dst).absolute()
    if not components:
        raise ValueError("save_checkpoint: no components to write.")
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    check_destination(dst, overwrite)
    with atomic_directory(dst, lambda d: check_destination(d, overwrite)) as tmp:
        entries = {}
        for name, (config, params) in components.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"component name {name!r} is not a plain folder name.")
            built = params() if callable(params) else params
            leaves = iter_leaves(built) if isinstance(built, Mapping) else iter(built)
            del built  # only `leaves` may hold a built pytree: it is freed once written, before the next one
            (tmp / name).mkdir()
            (tmp / name / CONFIG_NAME).write_text(json.dumps(config_dict(name, config), indent=2) + "\n")
            written = _write_params(tmp / name / PARAMS_DIR, leaves, piece_bytes)
            entries[name] = {
                "class": COMPONENT_KINDS[name].diffusers_class if name in COMPONENT_KINDS else None,
                "config": f"{name}/{CONFIG_NAME}",
                "params": f"{name}/{PARAMS_DIR}",
                **written,
            }
        marker = {"format": FORMAT, "version": VERSION, "components": entries, **dict(metadata or {})}
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return dst


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker JSON of our checkpoint at `path`; a path that is not one is an error saying what it expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory.")
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a customshift checkpoint: expected a directory with {MARKER} (written "
                         f"by `customshift convert`).")
    marker = json.loads((path / MARKER).read_text())
    if marker.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint format version {marker.get('version')} is newer than this library "
                         f"reads ({VERSION}); upgrade customshift-jax.")
    return marker


def checkpoint_components(path: str | Path) -> list[str]:
    """Names of the components stored in our checkpoint at `path`."""
    return list(read_marker(path).get("components", {}))


def load_checkpoint_config(path: str | Path, name: str) -> Any:
    """One component's config from our checkpoint, no params read."""
    path = Path(path)
    entry = read_marker(path).get("components", {})[name]
    raw = json.loads((path / entry.get("config", f"{name}/{CONFIG_NAME}")).read_text())
    kind = COMPONENT_KINDS.get(name)
    return kind.config_from_dict(raw) if kind else raw


def load_checkpoint(path: str | Path, components: Iterable[str] | None = None) -> dict[str, tuple[Any, Params]]:
    """{name: (config, params)} from our checkpoint; params are numpy arrays in the stored dtype.

    Known components get their typed config (`MMDiTConfig`, `VAEConfig`); others the raw config dict.
    `components` picks some (default all); asking for one that is absent names the ones present.
    """
    path = Path(path)
    marker = read_marker(path)
    present = marker.get("components", {})
    wanted = list(present) if components is None else list(components)
    absent = [c for c in wanted if c not in present]
    if absent:
        raise ValueError(f"{path}: no {', '.join(absent)} in this checkpoint; it holds "
                         f"{', '.join(present) or 'nothing'}.")
    out = {}
    for name in wanted:
        entry = present[name]
        config_path = path / entry.get("config", f"{name}/{CONFIG_NAME}")
        raw = json.loads(config_path.read_text())
        kind = COMPONENT_KINDS.get(name)
        config = kind.config_from_dict(raw) if kind else raw
        params_path = (path / entry.get("params", f"{name}/{PARAMS_DIR}")).absolute()
        out[name] = (config, _read_params(params_path, entry.get(PIECES_KEY), name))
    return out


def _read_params(params_path: Path, pieces: list[str] | None, name: str) -> Params:
    """The params of one component: its pieces merged (version 2), or its one PyTree (version 1, no pieces)."""
    paths = [params_path] if pieces is None else [params_path / piece for piece in pieces]
    for p in [params_path, *paths]:
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: the {name} params are missing; the checkpoint is damaged.")
    params: Params = {}
    with _checkpointer() as ckptr:
        for p in paths:
            nest_leaves(iter_leaves(ckptr.restore(p)), into=params)
    return params
