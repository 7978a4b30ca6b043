"""CustomShift LoRA export format: JAX LoRA trees <-> a PEFT / diffusers-named state dict, and its files.

State dict (numpy, one object for both branches; what `TorchCustomShift.export_lora_state_dict` returns):

    transformer_blocks.N.<module>.lora_A.weight      (r, in)   CGB, PEFT's default adapter names
    transformer_blocks.N.<module>.lora_B.weight      (out, r)  CGB
    transformer_blocks.N.attn.cads_beta              (H,)      CGB's CADS shift beta of layer N
    rab.transformer_blocks.N.<module>.lora_A.weight  (r, in)   RAB: the same names under the "rab." prefix
    rab.transformer_blocks.N.<module>.lora_B.weight  (out, r)  RAB

<module> is the diffusers module name inside the block (`attn.to_q`, `attn.to_out.0`, `attn2.to_k`,
`ff.net.0.proj`, ...). The JAX kernels are (in, r) and (r, out): a key holds the transpose of one layer
of the stacked leaf, so both directions are exact (bit for bit). Scale = alpha / rank, as in PEFT.

Files (`save_lora_files` / `load_lora_files`), one directory:

    customshift_cgb.safetensors   CGB LoRA, keys prefixed "transformer." and diffusers' `lora_adapter_metadata`
                                  (r, lora_alpha, target_modules): the layout of diffusers' own
                                  `save_lora_weights`, so `StableDiffusion3Pipeline.load_lora_weights(dir,
                                  weight_name="customshift_cgb.safetensors")` puts it on a plain SD3 (needs peft).
    customshift_rab.safetensors   RAB LoRA, same layout (loadable as a second adapter, e.g. "rab").
    customshift_beta.safetensors  `transformer_blocks.N.attn.cads_beta`; not a LoRA, so diffusers ignores it.

Each file also carries `customshift_lora` metadata (branch, rank, alpha, targets, "text_settings" the training data
was encoded with (customshift_jax.io.text_settings), "content_hash" of its tensors (customshift_jax.io.integrity) and
"file_hash" of the tensors and every metadata field) for `load_lora_files`, which checks them: an edited alpha is
refused like a damaged tensor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from customshift_jax.customshift.branches import lora_shapes as expected_lora_shapes  # the shapes a file must hold
from customshift_jax.io.integrity import check_hash, tensors_hash, warn_unverified
from customshift_jax.io.safe_files import atomic_write, make_dir
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.mapping import StateDictMismatch, describe, to_numpy

RAB_PREFIX = "rab."
BETA_NAME = "cads_beta"
DIFFUSERS_PREFIX = "transformer."
CGB_FILE = "customshift_cgb.safetensors"
RAB_FILE = "customshift_rab.safetensors"
BETA_FILE = "customshift_beta.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
CUSTOMSHIFT_METADATA_KEY = "customshift_lora"
CONTENT_HASH_KEY = "content_hash"  # in the customshift_lora metadata: the tensors' hash (integrity.tensors_hash)
FILE_HASH_KEY = "file_hash"  # in the customshift_lora metadata: the tensors' and all the metadata's (`lora_file_hash`)
TEXT_SETTINGS_KEY = "text_settings"  # in the customshift_lora metadata (and our checkpoint's marker): io.text_settings

LoRATree = dict[str, Any]


class LoRAStateDictMismatch(StateDictMismatch):
    """A LoRA state dict that does not fit the model / rank; the message counts the keys and names the first."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
        super().__init__(what, missing, unexpected, misshaped, limit=1)
        # One line, short: the counts and the first key that differs (a LoRA of another model differs in hundreds).
        counts = [(len(items), label, items) for label, items in (("unexpected", self.unexpected),
                  ("missing", self.missing), ("wrong shape", self.misshaped)) if items]
        n, label, items = counts[0]
        first = f"{n} {label}: {items[0]}" + (f" ... and {n - 1} more" if n > 1 else "")
        others = f" Also {', '.join(f'{k} {lab}' for k, lab, _ in counts[1:])}." if counts[1:] else ""
        self.args = (f"{what} does not fit this model: {first}.{others} It was made for another model or rank.",)


def _parse_group(name: str) -> tuple[int, int]:
    start, stop = name.split(":")
    return int(start), int(stop)


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Leaves of a nested dict with their key paths, in sorted key order."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            out.extend(_flat(value, prefix + (key,)))
        else:
            out.append((prefix + (key,), value))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def keys_for_path(path: tuple[str, ...]) -> list[str]:
    """The state-dict keys (no prefix) of one LoRA-tree leaf, one per stacked layer.

    ("transformer_blocks", "a:b", "scan", *module, "lora_A" | "lora_B" | "beta").
    """
    if len(path) < 5 or path[0] != "transformer_blocks" or path[2] != "scan":
        raise ValueError(f"not a LoRA-tree path of the joint blocks: {'/'.join(path)}")
    start, stop = _parse_group(path[1])
    module = ".".join(path[3:-1])
    leaf = path[-1]
    if leaf in ("lora_A", "lora_B"):
        suffix = f"{leaf}.weight"
    elif leaf == "beta":
        suffix = BETA_NAME
    else:
        raise ValueError(f"unknown LoRA leaf {leaf!r} at {'/'.join(path)}")
    return [f"transformer_blocks.{i}.{module}.{suffix}" for i in range(start, stop)]


def _layer_to_torch(leaf: str, layer: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(layer.T) if leaf in ("lora_A", "lora_B") else np.ascontiguousarray(layer)


def _torch_shape(leaf: str, layer_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(layer_shape)) if leaf in ("lora_A", "lora_B") else tuple(layer_shape)


def lora_tree_to_state_dict(tree: LoRATree, *, prefix: str = "") -> dict[str, np.ndarray]:
    """One branch's JAX LoRA tree -> state dict (numpy, exact): kernels transposed, layers unstacked."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in _flat(tree):
        array = to_numpy(leaf)
        keys = keys_for_path(path)
        if array.shape[0] != len(keys):
            raise ValueError(f"LoRA leaf {'/'.join(path)} has {array.shape[0]} layers, its group names {len(keys)}.")
        for key, layer in zip(keys, array):
            out[prefix + key] = _layer_to_torch(path[-1], layer)
    return out


def expected_state_dict_shapes(config: MMDiTConfig, lora_config: LoRAConfig, branch: str, *,
                               prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every key of one branch's state dict and its (torch) shape, in tree order."""
    out = {}
    for path, spec in _flat(expected_lora_shapes(config, lora_config, branch)):
        for key in keys_for_path(path):
            out[prefix + key] = _torch_shape(path[-1], tuple(spec.shape[1:]))
    return out


def _rank_hint(state_dict: Mapping[str, Any], keys: list[str], lora_config: LoRAConfig) -> str:
    ranks = sorted({tuple(state_dict[k].shape)[0] for k in keys if k.endswith(".lora_A.weight")})
    if ranks and ranks != [lora_config.rank]:
        return f" (LoRA rank {lora_config.rank} expected, the state dict has rank {', '.join(map(str, ranks))})"
    return ""


def check_lora_state_dict(config: MMDiTConfig, lora_config: LoRAConfig, state_dict: Mapping[str, Any], *,
                          branch: str, prefix: str = "") -> None:
    """Raise `LoRAStateDictMismatch` naming every missing, unexpected or mis-shaped key of one branch."""
    expected = expected_state_dict_shapes(config, lora_config, branch, prefix=prefix)
    missing = [k for k in expected if k not in state_dict]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} (expected {want})" for k, want in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != want]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected or misshaped:
        hint = _rank_hint(state_dict, [k for k in expected if k in state_dict], lora_config)
        raise LoRAStateDictMismatch(
            f"the {branch.upper()} LoRA state dict{hint} (expected rank {lora_config.rank} on {describe(config)})",
            missing, unexpected, misshaped)


def state_dict_to_lora_tree(config: MMDiTConfig, lora_config: LoRAConfig, state_dict: Mapping[str, Any], *,
                            branch: str, prefix: str = "") -> LoRATree:
    """One branch's state dict (keys under `prefix`, all of them) -> its JAX LoRA tree (numpy, exact)."""
    check_lora_state_dict(config, lora_config, state_dict, branch=branch, prefix=prefix)
    tree: LoRATree = {}
    for path, spec in _flat(expected_lora_shapes(config, lora_config, branch)):
        layers = [to_numpy(state_dict[prefix + key]) for key in keys_for_path(path)]
        dtype = np.result_type(*layers)
        out = np.empty(spec.shape, dtype)
        for j, layer in enumerate(layers):
            out[j] = layer.T if path[-1] in ("lora_A", "lora_B") else layer
        _set(tree, path, out)
    return tree


def to_state_dict(rab_lora: LoRATree | None, cgb_lora: LoRATree | None) -> dict[str, np.ndarray]:
    """Both branches' JAX trees -> the combined state dict (CGB plain names with beta, RAB under "rab.")."""
    out: dict[str, np.ndarray] = {}
    if cgb_lora is not None:
        out.update(lora_tree_to_state_dict(cgb_lora))
    if rab_lora is not None:
        out.update(lora_tree_to_state_dict(rab_lora, prefix=RAB_PREFIX))
    return out


def split_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Combined state dict -> {"cgb": LoRA keys, "rab": LoRA keys (prefix removed), "beta": beta keys}."""
    parts: dict[str, dict[str, Any]] = {"cgb": {}, "rab": {}, "beta": {}}
    for key, value in state_dict.items():
        if key.startswith(RAB_PREFIX):
            parts["rab"][key[len(RAB_PREFIX):]] = value
        elif key.endswith("." + BETA_NAME):
            parts["beta"][key] = value
        else:
            parts["cgb"][key] = value
    return parts


def from_state_dict(config: MMDiTConfig, lora_config: LoRAConfig,
                    state_dict: Mapping[str, Any]) -> tuple[LoRATree, LoRATree]:
    """The combined state dict -> (rab_lora, cgb_lora) JAX trees (numpy), every key checked."""
    rab_sd = {k: v for k, v in state_dict.items() if k.startswith(RAB_PREFIX)}
    cgb_sd = {k: v for k, v in state_dict.items() if not k.startswith(RAB_PREFIX)}
    return (state_dict_to_lora_tree(config, lora_config, rab_sd, branch="rab", prefix=RAB_PREFIX),
            state_dict_to_lora_tree(config, lora_config, cgb_sd, branch="cgb"))


def module_names(state_dict: Mapping[str, Any]) -> list[str]:
    """The diffusers module names that carry LoRA in a (one-branch, unprefixed) state dict."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_A." in k})


def diffusers_lora_metadata(lora_config: LoRAConfig, modules: list[str]) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata` for the transformer: the `peft.LoraConfig` fields, "transformer."-keyed.

    `target_modules` lists full module names, so PEFT adapts exactly these linears and no look-alike.
    """
    return {f"{DIFFUSERS_PREFIX}r": lora_config.rank, f"{DIFFUSERS_PREFIX}lora_alpha": lora_config.alpha,
            f"{DIFFUSERS_PREFIX}target_modules": list(modules)}


def save_lora_files(directory: str | Path, state_dict: Mapping[str, Any], lora_config: LoRAConfig, *,
                    text_settings: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the combined state dict as the three files of the module docstring (each atomically, never through a
    link, mode 0644); returns their paths. `text_settings` (`io.text_settings.TextSettings.to_json()`: how the
    training data's prompts were encoded) is recorded in each file's metadata."""
    from safetensors.numpy import save as safetensors_bytes

    directory = make_dir(directory, "LoRA folder")
    parts = split_state_dict({k: to_numpy(v) for k, v in state_dict.items()})
    ours = {"rank": lora_config.rank, "alpha": lora_config.alpha, "targets": list(lora_config.targets)}
    if text_settings is not None:
        ours[TEXT_SETTINGS_KEY] = dict(text_settings)
    written = []
    for branch, name in (("cgb", CGB_FILE), ("rab", RAB_FILE), ("beta", BETA_FILE)):
        tensors = {k: np.ascontiguousarray(v) for k, v in parts[branch].items()}
        if not tensors:
            continue
        if branch != "beta":
            modules = module_names(tensors)
            tensors = {DIFFUSERS_PREFIX + k: v for k, v in tensors.items()}
        content = tensors_hash(tensors)
        ours_here = {"branch": branch, **ours, CONTENT_HASH_KEY: content}
        metadata = {"format": "pt"}
        if branch != "beta":
            metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(diffusers_lora_metadata(lora_config, modules),
                                                             sort_keys=True)
        ours_here[FILE_HASH_KEY] = lora_file_hash(content, metadata, ours_here)
        metadata[CUSTOMSHIFT_METADATA_KEY] = json.dumps(ours_here)
        path = directory / name
        with atomic_write(path, "wb", what="LoRA file") as f:  # 0644 like every output (safetensors' own: 0600)
            f.write(safetensors_bytes(tensors, metadata=metadata))
        written.append(path)
    return written


def _one_line(error: BaseException) -> str:
    """The error's text on one line, for messages that end up as a single `error: ...` line."""
    return " ".join(str(error).split())


def check_finite_tensor(value: np.ndarray, key: str, path: Path) -> None:
    """Raise ValueError naming the key and file when a loaded tensor holds NaN or Inf (it would poison sampling)."""
    if not np.issubdtype(value.dtype, np.inexact):
        return
    bad = ~np.isfinite(value)
    if bad.any():
        what = "the CADS shift beta" if key.endswith("." + BETA_NAME) else "tensor"
        n_nan = int(np.isnan(value).sum())
        raise ValueError(f"{path}: {what} {key!r} holds {n_nan} NaN and {int(bad.sum()) - n_nan} Inf of "
                         f"{value.size} values; all must be finite (the training run diverged, or the file was "
                         "edited): re-export it from a finite training checkpoint.")


def _lora_config_from_meta(meta: Mapping[str, Any], path: Path) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, targets) from a file's `customshift_lora` metadata; alpha must be a finite number."""
    try:
        alpha = float(meta["alpha"])
        rank = int(meta["rank"])
        targets = tuple(meta["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {CUSTOMSHIFT_METADATA_KEY!r} metadata lacks a valid rank / alpha / targets "
                         f"({_one_line(e)}).") from None
    if not np.isfinite(alpha):
        raise ValueError(f"{path}: {CUSTOMSHIFT_METADATA_KEY!r} metadata has alpha {alpha}; it must be a finite "
                         "number (LoRA scale = alpha / rank).")
    return rank, alpha, targets


def _read_lora_file(path: Path, branch: str, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(customshift metadata, tensors by file key) of one LoRA file, its content hash checked (`verify`) and
    every tensor checked finite."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            others = dict(f.metadata() or {})
            meta = json.loads(others.pop(CUSTOMSHIFT_METADATA_KEY, "null") or "null")
            if meta is None or meta.get("branch") != branch:
                raise ValueError(f"{path}: no {CUSTOMSHIFT_METADATA_KEY!r} metadata for branch {branch!r}; "
                                 "not written by save_lora_files.")
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged or truncated ({_one_line(e)}); re-export it.") from None
    for key, value in tensors.items():  # first: a non-finite value is named, whatever made it
        check_finite_tensor(value, key, path)
    _lora_config_from_meta(meta, path)  # and a non-finite alpha, before the hash that covers it
    fix = "re-export it from its training checkpoint"
    if verify and meta.get(FILE_HASH_KEY) is not None:  # tensors and metadata (rank, alpha, targets, ...)
        check_hash(meta[FILE_HASH_KEY], lora_file_hash(tensors_hash(tensors), others, meta), f"LoRA file {path}",
                   fix="its tensors or metadata (rank, alpha, ...) changed since it was written; " + fix)
    elif verify and meta.get(CONTENT_HASH_KEY) is not None:  # written before the metadata was covered
        check_hash(meta[CONTENT_HASH_KEY], tensors_hash(tensors), f"LoRA file {path}", fix=fix)
        print(f"warning: the metadata of LoRA file {path} (rank, alpha) carries no content hash (written by an older "
              "customshift-jax); read unverified. Re-export it to add one.", file=sys.stderr)
    elif verify:
        warn_unverified(f"LoRA file {path}")
    return meta, tensors


def lora_file_hash(tensors_digest: str, metadata: Mapping[str, str], ours: Mapping[str, Any]) -> str:
    """"sha256:<hex>" of a LoRA file: its tensors' hash, its other metadata strings as stored, and our metadata
    (rank, alpha, targets, branch, ...) but this hash itself, in canonical JSON."""
    fields = {"tensors": tensors_digest,
              "metadata": {k: v for k, v in metadata.items() if k != CUSTOMSHIFT_METADATA_KEY},
              "ours": {k: v for k, v in ours.items() if k != FILE_HASH_KEY}}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_lora_files(directory: str | Path, *, verify: bool = True) -> tuple[dict[str, np.ndarray], LoRAConfig]:
    """Read what `save_lora_files` wrote: the combined state dict and the LoRAConfig (rank, alpha, targets).

    Damaged files (a content hash that differs, with `verify`), non-finite tensors (LoRA weights, beta) and a
    non-finite alpha raise ValueError naming the file.
    `directory` may also name one of the files (e.g. customshift_cgb.safetensors): its folder is read.
    """
    directory = Path(directory)
    if directory.is_file() and directory.name in (CGB_FILE, RAB_FILE, BETA_FILE):
        directory = directory.parent
    out: dict[str, np.ndarray] = {}
    found: dict[str, dict] = {}
    configs = set()
    for branch, name in (("cgb", CGB_FILE), ("rab", RAB_FILE), ("beta", BETA_FILE)):
        path = directory / name
        if not path.exists():
            continue
        meta, tensors = _read_lora_file(path, branch, verify)
        found[name] = meta
        configs.add(_lora_config_from_meta(meta, path))
        for key, value in tensors.items():
            if branch != "beta":
                if not key.startswith(DIFFUSERS_PREFIX):
                    raise ValueError(f"{path}: key {key!r} lacks the {DIFFUSERS_PREFIX!r} prefix.")
                key = key[len(DIFFUSERS_PREFIX):]
            out[(RAB_PREFIX if branch == "rab" else "") + key] = value
    if not found:
        what = "holds none of" if directory.is_dir() else "is no folder; expected one holding"
        raise FileNotFoundError(f"{directory} {what} {CGB_FILE}, {RAB_FILE}, {BETA_FILE}.")
    if len(configs) != 1:
        raise ValueError(f"{directory}: the files disagree on rank / alpha / targets: {sorted(found.items())}.")
    rank, alpha, targets = configs.pop()
    return out, LoRAConfig(rank=rank, alpha=alpha, targets=targets)


@dataclasses.dataclass(frozen=True)
class LoRAFiles:
    """A CustomShift LoRA as read from its folder (customshift_{rab,cgb,beta}.safetensors): the PEFT-named state
    dict and its `LoRAConfig` (rank, alpha, targets), checked (intact files, finite values)."""

    state_dict: dict
    config: LoRAConfig
    folder: Path


def read_lora_files(folder: str | Path, *, verify: bool = True, what: str = "lora") -> LoRAFiles:
    """`LoRAFiles` of `folder` (or of the folder of one of its files); errors start with `what` (the flag or
    argument the user typed)."""
    try:
        state_dict, config = load_lora_files(folder, verify=verify)
    except FileNotFoundError as e:  # the messages name the folder or file already
        raise FileNotFoundError(f"{what}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return LoRAFiles(state_dict, config, Path(folder))


def fit_lora(lora_files: LoRAFiles | None, config: MMDiTConfig) -> tuple[Any, Any, Any]:
    """(LoRAConfig, RAB LoRA tree, CGB LoRA tree with beta) for `config`, or (None, None, None) without a LoRA. A
    LoRA of another model fails here, naming the keys that do not fit."""
    if lora_files is None:
        return None, None, None
    rab, cgb = from_state_dict(config, lora_files.config, lora_files.state_dict)
    return lora_files.config, rab, cgb


__all__ = ["RAB_PREFIX", "BETA_NAME", "CGB_FILE", "RAB_FILE", "BETA_FILE", "LoRAStateDictMismatch",
           "keys_for_path", "lora_tree_to_state_dict", "state_dict_to_lora_tree", "expected_lora_shapes",
           "expected_state_dict_shapes", "check_lora_state_dict", "to_state_dict", "from_state_dict",
           "split_state_dict", "diffusers_lora_metadata", "save_lora_files", "load_lora_files",
           "check_finite_tensor", "LoRAFiles", "read_lora_files", "fit_lora"]
