"""PyTorch checkpoints -> our orbax checkpoint, streaming: tensors are read one at a time from memory-mapped
safetensors, mapped and cast into one param at a time, and their file pages dropped; params are written in
pieces as they are built (customshift_jax.io.checkpoint), so memory holds one piece, not the model, and the
result appears atomically. Every key is validated before anything is read or written.

Sources: a diffusers pipeline folder, one diffusers component folder (`transformer/`, `vae/`), or an
original single-file SD3 / SD3.5 safetensors (config inferred from the tensors, or given with --config).
"""
from __future__ import annotations

import ctypes
import dataclasses
import mmap
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from customshift_jax.io import single_file as sf
from customshift_jax.io.checkpoint import (
    COMPONENT_KINDS,
    Leaf,
    check_destination,
    is_checkpoint,
    iter_leaves,
    nest_leaves,
    save_checkpoint,
)
from customshift_jax.io.diffusers_folder import LazyStateDict, read_json, weight_files
from customshift_jax.io.leftovers import StopSignals
from customshift_jax.io.lora_files import TEXT_SETTINGS_KEY
from customshift_jax.io.safetensors import SafetensorsFile
from customshift_jax.io.text_encoders import CLASSES_KEY, TEXT_ENCODERS, TextEncoderSource, plan_text_encoders
from customshift_jax.models.mmdit.mapping import (
    StateDictMismatch,
    check_state_dict,
    describe,
    iter_params,
    state_dict_shapes,
    state_dict_views,
)
from customshift_jax.models.vae import vae_params_from_state_dict, vae_state_dict_from_params
from customshift_jax.numerics import FLOAT_DTYPES as DTYPES
from customshift_jax.numerics import float_dtype

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# The component table: everything the converter knows about a component is one entry here.


def _describe_vae(config) -> str:
    return (f"SD3 VAE (AutoencoderKL) with block_out_channels {list(config.block_out_channels)}, "
            f"{config.layers_per_block} layers per block, {config.latent_channels} latent channels, "
            f"{config.norm_num_groups} norm groups")


def _transformer_leaves(config, tensors, dtype, cast, on_tensor, what) -> Iterator[Leaf]:
    check_state_dict(config, tensors, what)
    return iter_params(config, tensors, dtype, cast, on_tensor)


def _vae_leaves(config, tensors, dtype, cast, on_tensor, what) -> Iterator[Leaf]:
    params = vae_params_from_state_dict(config, tensors)  # small (~84M values): mapped in one go, keys pre-checked
    for key in tensors:
        on_tensor(key, tensors[key])
    return ((path, cast(leaf, dtype)) for path, leaf in iter_leaves(params))


def _vae_state_dict(config, params) -> dict[str, np.ndarray]:
    return vae_state_dict_from_params(config, params)


def _transformer_state_dict(config, params) -> dict[str, np.ndarray]:
    return state_dict_views(config, params)


@dataclasses.dataclass(frozen=True)
class ComponentConverter:
    """How to validate, convert and export one component (DESIGN section 6)."""

    name: str
    prefix: str  # of its tensors in an original single file
    expected_shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # diffusers key -> torch shape
    describe: Callable[[Any], str]
    layout: Callable[[Any], dict[str, sf.OriginalTensor]]  # original single-file tensors
    infer_config: Callable[[Mapping[str, tuple[int, ...]], str], Any]
    to_leaves: Callable[..., Iterator[Leaf]]  # (config, tensors, dtype, cast, on_tensor, what): one param at a time
    to_state_dict: Callable[[Any, Params], dict[str, np.ndarray]]  # for export; views where possible

    @property
    def diffusers_class(self) -> str:
        return COMPONENT_KINDS[self.name].diffusers_class

    def config_from_dict(self, data: Mapping[str, Any]):
        return COMPONENT_KINDS[self.name].config_from_dict(data)


CONVERTERS: dict[str, ComponentConverter] = {
    "transformer": ComponentConverter(
        "transformer", sf.TRANSFORMER_PREFIX, state_dict_shapes, describe, sf.transformer_layout,
        sf.infer_transformer_config, _transformer_leaves, _transformer_state_dict),
    "vae": ComponentConverter(
        "vae", sf.VAE_PREFIX, sf.vae_state_dict_shapes, _describe_vae, sf.vae_layout,
        sf.infer_vae_config, _vae_leaves, _vae_state_dict),
}


# ---------------------------------------------------------------------------------------------------
# Memory: drop a memory-mapped tensor's pages from this process once it has been copied.


def release_pages(array: Any) -> None:
    """Drop the resident pages of a read-only memory-mapped numpy array (Linux madvise DONTNEED).

    The file stays in the page cache; the process's resident set no longer counts it. A no-op for
    arrays that are not backed by a read-only file mapping (never touches anonymous memory).
    """
    if not isinstance(array, np.ndarray) or array.size == 0 or not sys.platform.startswith("linux"):
        return
    node, file_backed = array, False
    while node is not None:
        if isinstance(node, np.memmap) and getattr(node, "mode", None) == "r":
            file_backed = True
            break
        if isinstance(node, mmap.mmap):
            break
        node = getattr(node, "base", None)
    if not file_backed:
        return
    start = array.__array_interface__["data"][0]
    low = start + sum(min(0, (n - 1) * s) for n, s in zip(array.shape, array.strides))
    high = start + sum(max(0, (n - 1) * s) for n, s in zip(array.shape, array.strides)) + array.itemsize
    page = mmap.PAGESIZE
    low -= low % page
    high += -high % page
    _libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), 4)  # MADV_DONTNEED = 4 on Linux


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC


# ---------------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass
class ComponentSource:
    """One component ready to convert: its config and a lazy diffusers-keyed view of its tensors."""

    name: str
    config: Any
    tensors: Mapping[str, np.ndarray]
    nbytes: int
    what: str  # where it comes from, for messages
    config_origin: str  # "config.json", "--config FILE" or "inferred from the tensor shapes"


@dataclasses.dataclass
class Plan:
    """Everything a conversion will do, validated: refusals happen while planning, before any writing."""

    src: Path
    kind: str  # "diffusers pipeline", "diffusers component", "single file"
    sources: list[ComponentSource]
    notes: list[str]
    text: list[TextEncoderSource] = dataclasses.field(default_factory=list)  # --components text_encoders
    tokenizers: dict[str, Path] = dataclasses.field(default_factory=dict)  # copied as files
    text_classes: dict[str, list] = dataclasses.field(default_factory=dict)  # their model_index.json entries

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in [*self.sources, *self.text])


def _component_of_config(data: Mapping[str, Any], where: str) -> str:
    """Which component a diffusers config dict describes; an unknown class is an unknown architecture."""
    cls = data.get("_class_name")
    for name, kind in COMPONENT_KINDS.items():
        if cls == kind.diffusers_class and name in CONVERTERS:
            return name
    if cls is None:
        if "joint_attention_dim" in data or "num_layers" in data:
            return "transformer"
        if "latent_channels" in data:
            return "vae"
    known = ", ".join(f"{k.diffusers_class} ({k.name})" for n, k in COMPONENT_KINDS.items() if n in CONVERTERS)
    raise ValueError(f"{where}: unknown architecture {cls or '(no _class_name)'}; this converter reads {known} "
                     f"from SD3 / SD3.5.")


def _check(what: str, arch: str, expected: Mapping[str, tuple], got: Mapping[str, tuple],
           shown: Callable[[str], str] = lambda k: k) -> None:
    """Raise StateDictMismatch naming missing, unexpected and mis-shaped keys (first 20 of each, then a count)."""
    missing = [shown(k) for k in expected if k not in got]
    unexpected = sorted(shown(k) for k in got if k not in expected)
    misshaped = [f"{shown(k)} {tuple(got[k])} (expected {tuple(v)})" for k, v in expected.items()
                 if k in got and tuple(got[k]) != tuple(v)]
    if missing or unexpected or misshaped:
        raise StateDictMismatch(f"{what} (expected {arch})", missing, unexpected, misshaped)


def parse_components(components: str | Iterable[str] | None) -> list[str] | None:
    if components is None:
        return None
    names = [c.strip() for c in (components.split(",") if isinstance(components, str) else components) if c.strip()]
    unknown = [c for c in names if c not in CONVERTERS and c != TEXT_ENCODERS]
    if unknown or not names:
        raise ValueError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join([*CONVERTERS, TEXT_ENCODERS])}.")
    return names


def _select(available: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if wanted is None:
        if not available:
            raise ValueError(f"{where}: holds none of the components this converter reads ({', '.join(CONVERTERS)}).")
        return available
    absent = [c for c in wanted if c not in available]
    if absent:
        raise ValueError(f"{where}: has no {', '.join(absent)}; it holds {', '.join(available) or 'nothing we read'}. "
                         f"Drop it from --components.")
    return wanted


def read_config_overrides(paths: Sequence[str | Path]) -> dict[str, dict]:
    """{component: diffusers config dict} from --config values: config.json files, component or pipeline folders."""
    out: dict[str, dict] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"--config {path}: no such file or folder.")
        if path.is_file():
            files = [path]
        else:
            files = [path / n / "config.json" for n in CONVERTERS if (path / n / "config.json").is_file()]
            if not files and (path / "config.json").is_file():
                files = [path / "config.json"]
            if not files:
                raise FileNotFoundError(f"--config {path}: no config.json, transformer/config.json or vae/config.json "
                                        f"in this folder.")
        for f in files:
            data = read_json(f)
            name = _component_of_config(data, str(f))
            out[name] = data
    return out


def _diffusers_source(name: str, folder: Path) -> ComponentSource:
    data = read_json(folder / "config.json")
    got_name = _component_of_config(data, str(folder / "config.json"))
    if got_name != name:
        raise ValueError(f"{folder}: config.json describes a {got_name}, not a {name}.")
    conv = CONVERTERS[name]
    config = conv.config_from_dict(data)
    tensors = LazyStateDict(weight_files(folder))
    what = f"{folder}"
    _check(what, conv.describe(config), conv.expected_shapes(config), {k: tensors.shape(k) for k in tensors})
    return ComponentSource(name, config, tensors, tensors.nbytes(), what, f"{folder / 'config.json'}")


def _single_file_sources(path: Path, wanted: list[str] | None, overrides: dict[str, dict]
                         ) -> tuple[list[ComponentSource], list[str]]:
    st = SafetensorsFile(path)
    keys = st.keys()
    found, text, unknown = sf.split_prefixes(keys)
    notes = []
    if not found and any(k.startswith(("transformer_blocks.", "encoder.down_blocks.")) for k in keys):
        raise ValueError(f"{path}: diffusers-format weights (transformer_blocks.* / encoder.down_blocks.* names), not "
                         f"an original single file; convert the folder that holds it with its config.json.")
    if not found:
        sample = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        raise ValueError(f"{path}: unknown architecture: not an SD3 / SD3.5 single-file checkpoint (no "
                         f"{sf.TRANSFORMER_PREFIX}* or {sf.VAE_PREFIX}* tensors; its {len(keys)} tensors are named "
                         f"like: {sample or 'nothing, the file is empty'}). Expected an original SD3 / SD3.5 file, "
                         f"a diffusers folder, or a diffusers component folder.")
    if unknown:
        raise StateDictMismatch(f"{path} (expected SD3 / SD3.5 single-file tensors under {sf.TRANSFORMER_PREFIX}, "
                                f"{sf.VAE_PREFIX} and text_encoders.)", unexpected=sorted(unknown))
    if text:
        groups = sorted({".".join(k.split(".")[:2]) for k in text})
        notes.append(f"skipped {len(text)} text-encoder tensors ({', '.join(groups)}): text encoders are not "
                     f"converted; load them from a diffusers pipeline.")
    names = _select([n for n in CONVERTERS if n in found], wanted, str(path))
    skipped = [n for n in found if n not in names]
    if skipped:
        notes.append(f"skipped the {', '.join(skipped)} tensors (not in --components).")
    sources = []
    for name in names:
        conv = CONVERTERS[name]
        file_keys = found[name]
        prefix = conv.prefix if all(k.startswith(conv.prefix) for k in file_keys) else ""
        shapes = {k[len(prefix):]: st.shape(k) for k in file_keys}
        what = f"{path}: its {name} ({prefix or 'bare names, no prefix'}*)"
        if name in overrides:
            config = conv.config_from_dict(overrides[name])
            origin = "--config"
        else:
            config = conv.infer_config(shapes, what)
            origin = "inferred from the tensor shapes"
            notes.append(f"{name} config inferred from the tensor shapes: {conv.describe(config)}.")
        layout = conv.layout(config)
        arch = conv.describe(config)
        if origin != "--config":
            arch += ", inferred from the tensor shapes; pass --config if the model is another"
        _check(what, arch, {k: t.shape for k, t in layout.items()}, shapes, shown=lambda k, p=prefix: p + k)
        view = sf.OriginalView(layout, lambda k, p=prefix: st.get(p + k), release_pages)
        nbytes = sum(int(np.prod(st.shape(k), dtype=np.int64)) * st.dtype(k).itemsize for k in file_keys)
        sources.append(ComponentSource(name, config, view, nbytes, what, origin))
    return sources, notes


def plan_conversion(src: str | Path, *, components: str | Iterable[str] | None = None,
                    config_paths: Sequence[str | Path] = ()) -> Plan:
    """Find what SRC holds, pick the components, read or infer their configs and validate every key and
    shape, reading no tensor data. Any refusal (unknown architecture, mismatched keys) is raised here."""
    src = Path(src)
    wanted = parse_components(components)
    text = wanted is not None and TEXT_ENCODERS in wanted
    if text:
        wanted = [c for c in wanted if c != TEXT_ENCODERS]
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder.")
    overrides = read_config_overrides(config_paths)
    if text and not (src / "model_index.json").is_file():
        raise ValueError(f"{src}: --components {TEXT_ENCODERS} reads a diffusers pipeline folder (model_index.json, "
                         "text_encoder/, text_encoder_2/, text_encoder_3/ and their tokenizers); drop it from "
                         "--components or give such a folder.")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ValueError(f"{src}: not a .safetensors file. Pickled checkpoints (.ckpt, .pt, .bin) are not read "
                             f"(loading them runs code); convert them to safetensors first.")
        sources, notes = _single_file_sources(src, wanted, overrides)
        return Plan(src, "single file", sources, notes)
    if overrides:
        raise ValueError(f"--config applies to single-file sources only; {src} is a folder with its own config.json "
                         f"files.")
    if is_checkpoint(src):
        raise ValueError(f"{src} is already a customshift checkpoint; `customshift export` turns it back into "
                         f"diffusers folders.")
    subfolders = [n for n in CONVERTERS if (src / n / "config.json").is_file()]
    if (src / "model_index.json").is_file() or subfolders:
        names = _select(subfolders, wanted, str(src)) if wanted or not text else []
        plan = Plan(src, "diffusers pipeline", [_diffusers_source(n, src / n) for n in names], [])
        if text:
            plan.text, plan.tokenizers, plan.text_classes = plan_text_encoders(src)
        return plan
    if (src / "config.json").is_file():
        name = _component_of_config(read_json(src / "config.json"), str(src / "config.json"))
        _select([name], wanted, str(src))
        return Plan(src, "diffusers component", [_diffusers_source(name, src)], [])
    raise FileNotFoundError(f"{src}: neither a diffusers pipeline folder (model_index.json, transformer/, vae/), a "
                            f"diffusers component folder (config.json + diffusion_pytorch_model.safetensors), nor "
                            f"a .safetensors single file.")


# ---------------------------------------------------------------------------------------------------
# Converting


def cast_array(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` in `dtype`: float32 -> bfloat16 rounds to nearest even (ml_dtypes), bit for bit like torch's
    `.to(bfloat16)` for every non-NaN value (a NaN stays a NaN; its payload bits may differ from torch's)."""
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if dtype == DTYPES["bf16"] and array.dtype == np.float16:
        array = array.astype(np.float32)  # exact; then one rounding to bf16
    with np.errstate(invalid="ignore", over="ignore"):  # NaN stays NaN, overflow rounds to inf: both correct
        return array.astype(dtype)


class Progress:
    """A tqdm bar of tensors done of total with MB/s, shown only when the work takes more than a few seconds."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool = True, delay: float = 2.0,
                 mininterval: float | None = None):
        self.bytes, self.start = 0, time.perf_counter()
        self.total_bytes = total_bytes
        self.bar, self.delay = None, delay
        if enabled and total_tensors:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            if mininterval is None:  # a terminal: live; a log file: an update every half minute is plenty
                mininterval = 0.1 if tty else 30.0
            # A log file keeps the final count (its last periodic line can be well short of the total).
            self.bar = tqdm(total=total_tensors, unit="tensor", desc="converting", delay=delay, file=sys.stderr,
                            dynamic_ncols=True, leave=not tty, mininterval=mininterval)

    def update(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            rate = self.bytes / max(time.perf_counter() - self.start, 1e-9) / 1e6
            self.bar.set_postfix_str(f"{rate:.0f} MB/s", refresh=False)
            self.bar.update(1)

    def stage(self, text: str) -> None:
        """Name what is happening now (e.g. "converting vae")."""
        if self.bar is not None:  # shown at once only once the bar is (after `delay`): quick runs stay quiet
            self.bar.set_description_str(text, refresh=time.perf_counter() - self.start >= self.delay)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def convert(src: str | Path, dst: str | Path, *, dtype: str = "fp32", components: str | Iterable[str] | None = None,
            config_paths: Sequence[str | Path] = (), overwrite: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None, piece_bytes: int | None = None,
            text_settings: Mapping[str, Any] | None = None) -> tuple[Path, Plan]:
    """Convert SRC (diffusers folder / component / original single file) into our orbax checkpoint at DST.

    Validates everything first; streams tensors (memory-mapped, one at a time) into params of `dtype`
    ("fp32" or "bf16"), written in pieces of about `piece_bytes` (default: the checkpoint module's) as they
    are built; writes atomically (DST appears only when complete; an existing DST is replaced only with
    `overwrite`, and only once the new one is complete). `text_settings` (`io.text_settings.TextSettings.to_json()`:
    how the model's prompts were encoded in training) is recorded in the marker. Returns (DST, the plan it carried
    out).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    target = float_dtype(dtype, "--dtype")
    dst = Path(dst).absolute()
    src_abs = Path(src).absolute()
    if dst == src_abs or src_abs in dst.parents:
        raise ValueError(f"destination {dst} is inside the source {src_abs}; choose a destination outside it.")
    check_destination(dst, overwrite)
    plan = plan_conversion(src, components=components, config_paths=config_paths)
    for note in plan.notes:
        log(f"note: {note}")
    bar = Progress(sum(len(s.tensors) for s in plan.sources) + sum(t.tensors for t in plan.text), plan.nbytes,
                   enabled=progress)
    stop = StopSignals()  # SIGINT / SIGTERM stop between tensors: the partial DST is removed, orbax never cut off

    def on_tensor(key: str, value: Any) -> None:
        bar.update(int(getattr(value, "nbytes", 0)))
        release_pages(value)
        stop.check()

    def builder(source: ComponentSource) -> Callable[[], Iterator[Leaf]]:
        conv = CONVERTERS[source.name]

        def build() -> Iterator[Leaf]:
            bar.stage(f"converting {source.name}")  # and writing it, piece by piece
            return conv.to_leaves(source.config, source.tensors, target, cast_array, on_tensor, source.what)

        return build

    def text_builder(source: TextEncoderSource) -> Callable[[], Iterator[Leaf]]:
        def build() -> Iterator[Leaf]:
            bar.stage(f"converting {source.name}")
            return ((path, cast_array(leaf, target)) for path, leaf in source.leaves(on_tensor))

        return build

    metadata = {"source": str(src_abs), "source_kind": plan.kind, "created_by": "customshift convert",
                "config_origin": {s.name: s.config_origin for s in plan.sources}}
    parts = {s.name: (s.config, builder(s)) for s in plan.sources}
    for t in plan.text:
        parts[t.name] = (t.config, text_builder(t))
        metadata["config_origin"][t.name] = f"{t.folder / 'config.json'}"
    if plan.text:
        metadata[CLASSES_KEY] = plan.text_classes
    if text_settings is not None:
        metadata[TEXT_SETTINGS_KEY] = dict(text_settings)
    try:
        with stop:
            save_checkpoint(dst, parts, overwrite=overwrite, metadata=metadata, piece_bytes=piece_bytes, log=log,
                            folders=plan.tokenizers)
    finally:
        bar.close()
    return dst, plan


def load_single_file(path: str | Path, component: str, *, config: Any = None, dtype: Any = np.float32
                     ) -> tuple[Any, Params]:
    """(config, numpy params) of one component of an original single-file checkpoint, in memory.

    `config` (a config object or diffusers config dict) overrides the shape inference.
    """
    overrides = {}
    if config is not None:
        data = config.to_diffusers_config() if hasattr(config, "to_diffusers_config") else dict(config)
        overrides[component] = data
    parse_components([component])
    sources, _ = _single_file_sources(Path(path), [component], overrides)
    source = sources[0]
    conv = CONVERTERS[component]
    leaves = conv.to_leaves(source.config, source.tensors, np.dtype(dtype), cast_array,
                            lambda key, value: release_pages(value), source.what)
    return source.config, nest_leaves(leaves)
