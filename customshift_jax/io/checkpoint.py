"""Our checkpoint format (DESIGN section 6): one directory, a marker JSON, and per component its diffusers
config JSON beside its params as orbax PyTrees. Writes are atomic: a checkpoint is complete or absent.

Layout (version 3)::

    DST/customshift_checkpoint.json   {"format": "customshift-jax-checkpoint", "version": 3, "components": {...},
                                       "marker_hash": "sha256:..."}
    DST/<component>/config.json       the diffusers config (`_class_name` included), e.g. SD3Transformer2DModel
    DST/<component>/params/part-NNNNN/  orbax PyTree checkpoints of numpy arrays, each restorable by plain
                                        orbax; each holds some of the leaves (same nested paths), together all

The marker's component entry lists its pieces ("pieces": ["part-00000", ...]); they are written one at a
time (about `PIECE_BYTES` each), so a writer holds one piece in memory, not the component. Version 1 (no
"pieces") stored the params as one orbax PyTree in DST/<component>/params/; it is still read. The entry's
"hashes" ({piece: "sha256:..."}, customshift_jax.io.integrity) are checked when loading (`verify`), and the
config is checked against the stored shapes (customshift_jax.io.config_check); older checkpoints without
hashes load with a warning. Version 3 also records each config.json's hash ("config_hash") and the marker's own
("marker_hash", over every other field), so an edited config or marker is refused like a damaged piece.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import jax
import numpy as np

from customshift_jax.io.config_check import check_fits
from customshift_jax.io.integrity import (
    HASHES_KEY,
    DamagedCheckpoint,
    check_hash,
    file_hash,
    leaves_hash,
    warn_unverified,
)
from customshift_jax.io.leftovers import OWNER_FILE, atomic_directory, name_some
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.tree_paths import named_leaves

FORMAT = "customshift-jax-checkpoint"
VERSION = 3  # 3: the marker's own hash and each config.json's; a version-3 marker without them is refused
MARKER = "customshift_checkpoint.json"
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"
PIECES_KEY = "pieces"
FOLDERS_KEY = "folders"  # {name: {"hashes": {relative file: hash}}}: folders stored as files (tokenizers)
CONFIG_HASH_KEY = "config_hash"  # in a component's entry: file_hash of its config.json
MARKER_HASH_KEY = "marker_hash"  # at the top of the marker: marker_hash() of every other field
ENTRY_KEYS = ("class", "config", "params", PIECES_KEY, HASHES_KEY, CONFIG_HASH_KEY, "dtype", "num_params")
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


def _marker_json(path: Path, fix: str = "re-run `customshift convert` to rewrite the checkpoint") -> Any:
    """The parsed marker file of `path` (absent: None); a marker that is not JSON is named as damaged."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"the checkpoint marker {marker} is damaged (not JSON: {' '.join(str(e).split())}); "
                                f"{fix}.") from None


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory holding our marker JSON with our format name, or a damaged marker of that
    name (the loaders then say it is damaged, instead of "not a checkpoint")."""
    try:
        data = _marker_json(Path(path))
    except DamagedCheckpoint:
        return True
    except OSError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


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
    for path, leaf in named_leaves(params):
        yield path, np.asarray(leaf)


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


def _save_piece(ckptr: Any, hasher: Any, directory: Path, hashes: dict[str, str], piece: Params) -> None:
    """Write `piece` as the next plain orbax PyTree directory/part-NNNNN, its content hashed meanwhile."""
    import orbax.checkpoint as ocp

    name = f"part-{len(hashes):05d}"
    digest = hasher.submit(leaves_hash, list(iter_leaves(piece)))
    ckptr.save(directory / name, args=ocp.args.PyTreeSave(piece))
    hashes[name] = digest.result()


def _write_params(directory: Path, leaves: Iterable[Leaf], piece_bytes: int) -> dict[str, Any]:
    """Write leaves as orbax PyTrees of about `piece_bytes` each, holding one piece at a time (a leaf is
    dropped once its piece is written); returns the marker fields: pieces, their hashes, dtype, num_params."""
    directory.mkdir()
    hashes: dict[str, str] = {}
    dtypes, count = set(), 0
    piece: Params = {}
    size = 0
    with _checkpointer() as ckptr, concurrent.futures.ThreadPoolExecutor(1) as hasher:
        for path, leaf in leaves:
            leaf = np.asarray(leaf)
            dtypes.add(leaf.dtype)
            count += leaf.size
            size += leaf.nbytes
            nest_leaves([(path, leaf)], into=piece)
            del leaf
            if size >= piece_bytes:
                _save_piece(ckptr, hasher, directory, hashes, piece)
                piece, size = {}, 0
        if piece:
            _save_piece(ckptr, hasher, directory, hashes, piece)
    return {PIECES_KEY: list(hashes), HASHES_KEY: hashes, "dtype": _dtype_name(dtypes), "num_params": int(count)}


def foreign_files(dst: Path) -> str | None:
    """The files in our checkpoint `dst` that our writer did not make (the first few, then a count), or None."""
    marker = _marker_json(dst) or {}
    components = marker.get("components", {})
    foreign = []
    for entry in sorted(dst.iterdir()):
        if entry.name in (MARKER, OWNER_FILE):
            continue
        if entry.name in marker.get(FOLDERS_KEY, {}) and entry.is_dir() and not entry.is_symlink():
            listed = marker[FOLDERS_KEY][entry.name].get(HASHES_KEY, {})
            foreign += [p for p in sorted(entry.rglob("*")) if p.is_file() and str(p.relative_to(entry)) not in listed]
            continue
        if entry.name in components and entry.is_dir() and not entry.is_symlink():
            foreign += [p for p in sorted(entry.iterdir()) if p.name not in (CONFIG_NAME, PARAMS_DIR)]
        else:
            foreign.append(entry)
    return name_some(foreign, dst)


def check_destination(dst: str | Path, overwrite: bool, *, is_ours: Callable[[Path], bool] | None = None,
                      what: str = "new checkpoint", ours: str = f"a customshift checkpoint (no {MARKER})",
                      foreign: Callable[[Path], str | None] = foreign_files) -> None:
    """Refuse a destination we must not replace; say what to do instead (called again before the rename).

    `is_ours` recognises an earlier output of the same writer (default: our checkpoints), the only kind of
    non-empty directory that `overwrite` may replace, and only when `foreign` finds no file the writer did not
    make in it; `what` and `ours` name them in the messages.
    """
    dst = Path(dst)
    ours_by_marker = is_ours is None
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
    if ours_by_marker:
        _marker_json(dst, fix="so --overwrite cannot tell that the folder is ours: remove it yourself, then write it "
                          "again")  # a damaged marker is named as such, not as missing
    if not is_ours(dst):
        raise CheckpointExists(f"{dst} exists and is not {ours}; refusing to replace it, even with overwrite. "
                               f"Remove it yourself or choose another destination.")
    others = foreign(dst)
    if others:
        raise CheckpointExists(f"{dst} holds files that are not part of it ({others}); refusing to replace it, even "
                               f"with overwrite (they would be deleted). Move them out or choose another destination.")


def save_checkpoint(
    dst: str | Path,
    components: Mapping[str, tuple[Any, ParamsSource]],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    piece_bytes: int | None = None,
    log: Callable[[str], None] | None = None,
    folders: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write {name: (config, params)} as one checkpoint at `dst`, atomically; returns `dst`.

    Everything is written into a temporary directory beside `dst` and renamed into place when complete.
    An existing `dst` is refused unless `overwrite`, and then replaced only after the new one is complete
    (only an earlier checkpoint of ours or an empty directory is ever replaced). Params are numpy/jax
    pytrees, written as they are (no copy), or zero-argument callables that build them, one component at
    a time. A callable may return an iterable of (path, array) leaves instead: the leaves are written in
    pieces of about `piece_bytes` (default `PIECE_BYTES`) as they come, so only one piece is in memory.
    `metadata` goes into the marker JSON. Stale temporary folders of `dst` from killed runs are removed, and
    said so through `log` (default stderr). `folders` ({name: source folder}) are copied in as files, each
    file's hash recorded in the marker (e.g. tokenizers; read back with `checkpoint_folder`).
    """
    dst = Path(dst).absolute()
    if not components:
        raise ValueError("save_checkpoint: no components to write.")
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    check_destination(dst, overwrite)
    with atomic_directory(dst, lambda d: check_destination(d, overwrite), log=log) as tmp:
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
                CONFIG_HASH_KEY: file_hash(tmp / name / CONFIG_NAME),
            }
        copied = {name: {HASHES_KEY: _copy_folder(Path(source), tmp / name)} for name, source in (folders or {}).items()}
        marker = {"format": FORMAT, "version": VERSION, "components": entries, **dict(metadata or {})}
        if copied:
            marker[FOLDERS_KEY] = copied
        marker[MARKER_HASH_KEY] = marker_hash(marker)
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return dst


def _copy_folder(src: Path, dst: Path) -> dict[str, str]:
    """Copy the files of `src` (recursively, no links) into the new folder `dst`; their hashes by relative path."""
    import shutil

    if dst.name in (MARKER, OWNER_FILE) or dst.exists():
        raise ValueError(f"folder name {dst.name!r} is taken in the checkpoint.")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder to store in the checkpoint.")
    hashes = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
        hashes[str(rel)] = file_hash(dst / rel)
    return hashes


def checkpoint_folders(path: str | Path) -> list[str]:
    """Names of the folders stored as files in our checkpoint at `path` (e.g. tokenizer, tokenizer_2)."""
    return list(read_marker(path).get(FOLDERS_KEY, {}))


def checkpoint_folder(path: str | Path, name: str, *, verify: bool = True) -> Path:
    """The folder `name` stored as files in our checkpoint, each file checked against its recorded hash."""
    path = Path(path)
    marker = read_marker(path)
    if verify:
        verify_marker(path, marker)
    stored = marker.get(FOLDERS_KEY, {})
    if name not in stored:
        raise ValueError(f"{path}: no folder {name} in this checkpoint; it holds {', '.join(stored) or 'none'}.")
    folder = path / name
    for rel, expected in stored[name].get(HASHES_KEY, {}).items():
        f = folder / rel
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing from the checkpoint's {name} folder; the checkpoint is damaged: "
                                    "re-run `customshift convert`.")
        if verify:
            check_hash(expected, file_hash(f), f"the {name} file {f}")
    return folder


def marker_hash(marker: Mapping[str, Any]) -> str:
    """"sha256:<hex>" of the marker's fields (all but its own hash), in a canonical JSON form."""
    import hashlib

    fields = {k: v for k, v in marker.items() if k != MARKER_HASH_KEY}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _hashed(marker: Mapping[str, Any]) -> bool:
    """Whether the marker is of the kind that covers itself and the configs (version 3, or carrying its hash)."""
    return marker.get("version", 0) >= 3 or MARKER_HASH_KEY in marker


def verify_marker(path: Path, marker: Mapping[str, Any]) -> None:
    """Refuse a marker whose fields were edited or damaged after writing (its own hash), and one of version 3 that
    lacks its hash; a marker of before (version 2 or 1) has none to check."""
    if not _hashed(marker):
        return
    if MARKER_HASH_KEY not in marker:
        raise DamagedCheckpoint(f"the checkpoint marker {path / MARKER} (version {marker.get('version')}) lacks its "
                                f"{MARKER_HASH_KEY!r}: it was edited or damaged; re-run `customshift convert` (or "
                                "pass --no-verify / verify=False to load it anyway).")
    check_hash(marker[MARKER_HASH_KEY], marker_hash(marker), f"the checkpoint marker {path / MARKER}")


def _component_hashes(path: Path, marker: Mapping[str, Any], name: str, entry: Mapping[str, Any],
                      log: Callable[[str], None] | None) -> Mapping[str, str] | None:
    """The pieces' recorded hashes of component `name` (verify); None, with the old-checkpoint warning, for a
    marker written before hashes. A version-3 marker without them, or an entry holding hashes under another key
    (renamed), is refused: the marker was edited, and its pieces cannot be checked."""
    hashes = entry.get(HASHES_KEY)
    if hashes is not None:
        return hashes
    renamed = [k for k, v in entry.items() if k not in ENTRY_KEYS and isinstance(v, dict)
               and any(isinstance(x, str) and x.startswith("sha256:") for x in v.values())]
    if _hashed(marker) or renamed:
        how = f"has {renamed[0]!r} in its place" if renamed else f"is version {marker.get('version')}, which has them"
        raise DamagedCheckpoint(f"the checkpoint marker {path / MARKER} lacks the {name}'s {HASHES_KEY!r} (the entry "
                                f"{how}): the marker was edited or damaged and the {name} params cannot be checked; "
                                "re-run `customshift convert` (or pass --no-verify / verify=False to load it "
                                "anyway).")
    warn_unverified(f"the {name} of checkpoint {path}", log)
    return None


def _verify_config(path: Path, marker: Mapping[str, Any], name: str, entry: Mapping[str, Any],
                   config_path: Path, log: Callable[[str], None] | None) -> None:
    """config.json against the hash its entry records; a version-3 entry must record one."""
    expected = entry.get(CONFIG_HASH_KEY)
    if expected is None:
        if _hashed(marker):
            raise DamagedCheckpoint(f"the checkpoint marker {path / MARKER} lacks the {name}'s {CONFIG_HASH_KEY!r}: "
                                    "the marker was edited or damaged; re-run `customshift convert`.")
        if entry.get(HASHES_KEY) is not None:  # hashed params, unhashed config: say what is not covered
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"warning: {config_path} carries no content hash (written by an older customshift-jax); read "
                "unverified. Re-run `customshift convert` to add one.")
        return
    check_hash(expected, file_hash(config_path), f"the {name} config {config_path}")


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker JSON of our checkpoint at `path`; a path that is not one is an error saying what it expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory.")
    marker = _marker_json(path) if path.is_dir() else None
    if not (isinstance(marker, dict) and marker.get("format") == FORMAT):
        raise ValueError(f"{path} is not a customshift checkpoint: expected a directory with {MARKER} (written "
                         f"by `customshift convert`).")
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


def load_checkpoint(path: str | Path, components: Iterable[str] | None = None, *, verify: bool = True,
                    log: Callable[[str], None] | None = None) -> dict[str, tuple[Any, Params]]:
    """{name: (config, params)} from our checkpoint; params are numpy arrays in the stored dtype.

    Known components get their typed config (`MMDiTConfig`, `VAEConfig`), checked against the stored shapes;
    others the raw config dict. `components` picks some (default all); asking for one that is absent names the
    ones present. `verify` checks each params piece against the hash in the marker (a checkpoint without hashes
    loads with a warning through `log`, default stderr).
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
    if verify:
        verify_marker(path, marker)
    for name in wanted:
        entry = present[name]
        config_path = path / entry.get("config", f"{name}/{CONFIG_NAME}")
        hashes = _component_hashes(path, marker, name, entry, log) if verify else None
        if verify:
            _verify_config(path, marker, name, entry, config_path, log)
        raw = json.loads(config_path.read_text())
        kind = COMPONENT_KINDS.get(name)
        config = kind.config_from_dict(raw) if kind else raw
        params_path = (path / entry.get("params", f"{name}/{PARAMS_DIR}")).absolute()
        params = _read_params(params_path, entry.get(PIECES_KEY), name, hashes)
        check_fits(config, params, f"{config_path}")
        out[name] = (config, params)
    return out


def _read_params(params_path: Path, pieces: list[str] | None, name: str,
                 hashes: Mapping[str, str] | None = None) -> Params:
    """The params of one component: its pieces merged (version 2), or its one PyTree (version 1, no pieces);
    each piece checked against `hashes` ({piece: hash}) when given."""
    names = [None] if pieces is None else list(pieces)
    paths = [params_path if n is None else params_path / n for n in names]
    for p in [params_path, *paths]:
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: the {name} params are missing; the checkpoint is damaged.")
    params: Params = {}
    with _checkpointer() as ckptr:
        for piece, p in zip(names, paths):
            try:
                leaves = list(iter_leaves(ckptr.restore(p)))
            except (PermissionError, MemoryError):
                raise  # the machine's faults, not the checkpoint's: said as such by the CLI
            except Exception as e:  # noqa: BLE001 -- orbax / tensorstore: whatever a damaged piece raises
                raise DamagedCheckpoint(f"the {name} params piece {p} cannot be read ({_short(e)}); the checkpoint "
                                        "is damaged: re-run `customshift convert`.") from None
            if hashes is not None:
                check_hash(hashes.get(piece, "(none)"), leaves_hash(leaves), f"the {name} params piece {p}")
            nest_leaves(leaves, into=params)
    return params


def _short(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to `limit` characters (tensorstore's can be pages long)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."
