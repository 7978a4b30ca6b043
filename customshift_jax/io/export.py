"""Our orbax checkpoint -> diffusers folders (`<component>/config.json` + `diffusion_pytorch_model.safetensors`)
that `SD3Transformer2DModel.from_pretrained` and `AutoencoderKL.from_pretrained` load. Exact: the bytes of
every tensor are the stored params, transposed back (fp32 in, fp32 out, bit for bit). Each written file's header
is checked against the shapes diffusers builds from the written config.json (customshift_jax.io.config_check),
and the export's marker records the content hash of every LoRA file it holds."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from customshift_jax.io.checkpoint import (
    atomic_directory,
    check_destination,
    checkpoint_folder,
    config_dict,
    load_checkpoint,
    read_marker,
)
from customshift_jax.io.config_check import check_exported_file
from customshift_jax.io.convert import CONVERTERS, DTYPES, cast_array, parse_components
from customshift_jax.io.diffusers_folder import WEIGHTS_NAME
from customshift_jax.io.integrity import HASHES_KEY, file_hash
from customshift_jax.io.leftovers import OWNER_FILE, StopSignals, name_some
from customshift_jax.io.lora_files import load_lora_files
from customshift_jax.io.safetensors import DTYPE_NAMES
from customshift_jax.io.text_encoders import CLASSES_KEY, DEFAULT_CLASSES, ENCODERS, TEXT_ENCODERS, TOKENIZERS
from customshift_jax.io.transformers_folder import WEIGHTS_NAME as TEXT_WEIGHTS_NAME
from customshift_jax.models.text_encoders.mapping import text_state_dict

EXPORT_MARKER = "customshift_export.json"


def _diffusers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.42.1"


def write_streaming(path: Path, tensors: Mapping[str, np.ndarray], dtype: np.dtype | None = None,
                    each: Callable[[], None] = lambda: None) -> None:
    """Write a safetensors file (torch's "pt" format metadata) from arrays or views, optionally cast, one
    tensor in memory at a time: the header comes from shapes alone, then each tensor is cast and written
    (`each()` runs between tensors: a safe point to stop at)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        dt = np.dtype(dtype or array.dtype)
        if dt not in DTYPE_NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dt} to safetensors.")
        nbytes = dt.itemsize * int(np.prod(array.shape, dtype=np.int64))
        header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            each()
            out = array if dtype is None else cast_array(array, dtype)
            f.write(np.ascontiguousarray(out).reshape(-1).view(np.uint8))


def _foreign_export_files(dst: Path) -> str | None:
    """Files in an earlier export `dst` that `export` does not write (the first few, then a count), or None."""
    components = set(CONVERTERS)
    ours = {EXPORT_MARKER, OWNER_FILE, "model_index.json", "scheduler", "lora", *TEXT_PARTS}
    foreign = []
    for entry in sorted(dst.iterdir()):
        if entry.name in components and entry.is_dir() and not entry.is_symlink():
            foreign += [p for p in sorted(entry.iterdir()) if p.name not in ("config.json", WEIGHTS_NAME)]
        elif entry.name not in ours:
            foreign.append(entry)
    return name_some(foreign, dst)


def _check_export_destination(dst: Path, overwrite: bool) -> None:
    check_destination(dst, overwrite, is_ours=lambda d: (d / EXPORT_MARKER).is_file(), what="export",
                      ours=f"an earlier `customshift export` (no {EXPORT_MARKER})", foreign=_foreign_export_files)


TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _text_folder(text_encoders: str | Path | None) -> tuple[Path | None, dict]:
    """(the pipeline folder holding the text encoders, its model_index.json), checked before anything is written."""
    if text_encoders is None:
        return None, {}
    folder = Path(text_encoders)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"--text-encoders {folder}: no model_index.json; give a diffusers SD3 pipeline folder "
                                "holding text_encoder/, text_encoder_2/, text_encoder_3/ and their tokenizers.")
    index = json.loads(index_file.read_text())
    missing = [p for p in TEXT_PARTS if isinstance(index.get(p), list) and index[p][0] and not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"--text-encoders {folder}: model_index.json lists {', '.join(missing)} but the "
                                "folder lacks them.")
    return folder, index


def _write_text_encoders(tmp: Path, src: Path, marker: dict, names: list[str], dtype: np.dtype | None, verify: bool,
                         stop: StopSignals, log: Callable[[str], None]) -> dict[str, list]:
    """The text encoders of our checkpoint as transformers folders (config.json + model.safetensors) and their
    tokenizers copied back, one encoder in memory at a time; returns their model_index.json entries."""
    import shutil

    classes = {**DEFAULT_CLASSES, **marker.get(CLASSES_KEY, {})}
    written = {}
    for name in names:
        raw, params = load_checkpoint(src, components=[name], verify=verify, log=log)[name]
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        write_streaming(tmp / name / TEXT_WEIGHTS_NAME, text_state_dict(params), dtype, stop.check)
        del params
        written[name] = classes[name]
    for tok in TOKENIZERS[:2] + (TOKENIZERS[2:] if "text_encoder_3" in names else ()):
        shutil.copytree(checkpoint_folder(src, tok, verify=verify), tmp / tok)
        written[tok] = classes[tok]
    return written


def _write_pipeline(tmp: Path, src: Path, text: Path | None, text_index: dict, lora: Path | None,
                    text_written: Mapping[str, list] | None = None) -> None:
    """model_index.json, scheduler/ (SRC's own, else SD3's), the text encoders and tokenizers copied from `text`
    (or already written from SRC: `text_written`; null without either), and the LoRA files in lora/: a folder
    `StableDiffusion3Pipeline.from_pretrained` loads."""
    import shutil

    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _diffusers_version(),
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    if (src / "scheduler").is_dir():
        shutil.copytree(src / "scheduler", tmp / "scheduler")
    else:
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({**SD3_SCHEDULER, "_diffusers_version": _diffusers_version()}, indent=2) + "\n")
    for part in TEXT_PARTS:
        entry = text_index.get(part, [None, None])
        if part in (text_written or {}):
            index[part] = text_written[part]
        elif text is not None and isinstance(entry, list) and entry[0]:
            shutil.copytree(text / part, tmp / part)
            index[part] = entry
        else:
            index[part] = [None, None]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if lora is not None:
        shutil.copytree(lora, tmp / "lora", ignore=shutil.ignore_patterns("*.partial*"))


def export(src: str | Path, dst: str | Path, *, components: str | Iterable[str] | None = None,
           dtype: str | None = None, overwrite: bool = False, text_encoders: str | Path | None = None,
           lora: str | Path | None = None, log: Callable[[str], None] | None = None, verify: bool = True) -> Path:
    """Write the components of our checkpoint SRC as diffusers folders DST/<component>/, atomically. With both
    the transformer and the VAE, DST is a whole pipeline folder (model_index.json, scheduler, the text encoders
    of `text_encoders` when given, the CustomShift LoRA files of `lora` in DST/lora/).

    `dtype` ("fp32"/"bf16") casts on the way out; default: as stored. DST appears only when complete; SIGINT /
    SIGTERM remove the partial DST. `verify` checks SRC's content hashes and the LoRA files' (default on).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    src, dst = Path(src), Path(dst).absolute()
    marker = read_marker(src)
    wanted = parse_components(components)
    present = [c for c in marker.get("components", {}) if c in CONVERTERS]
    text_names = [c for c in ENCODERS if c in marker.get("components", {})]
    others = [c for c in marker.get("components", {}) if c not in CONVERTERS and c not in text_names]
    if others:
        log(f"note: not exported (no diffusers form here): {', '.join(others)}.")
    if wanted is not None and TEXT_ENCODERS in wanted and not text_names:
        raise ValueError(f"{src}: has no text encoders to export; it holds {', '.join(present) or 'nothing'}.")
    # the checkpoint's own text encoders go out unless --text-encoders DIR gives others (or --components omits them)
    text_out = text_names if text_encoders is None and (wanted is None or TEXT_ENCODERS in wanted) else []
    names = present if wanted is None else [c for c in wanted if c != TEXT_ENCODERS]
    absent = [c for c in names if c not in present]
    if absent or not (names or text_out):
        raise ValueError(f"{src}: has no {', '.join(absent) or 'exportable component'}; it holds "
                         f"{', '.join(present) or 'nothing exportable'}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose fp32 or bf16.")
    whole = {"transformer", "vae"} <= set(names)
    if (text_encoders is not None or lora is not None) and not whole:
        raise ValueError("--text-encoders and --lora make a whole pipeline folder: export the transformer and the "
                         "VAE too (drop --components).")
    text, text_index = _text_folder(text_encoders)
    if lora is not None and not any(Path(lora).glob("customshift_*.safetensors")):
        raise FileNotFoundError(f"--lora {lora}: no customshift_*.safetensors files (a `customshift train` lora/ "
                                "folder).")
    if lora is not None:
        load_lora_files(lora, verify=verify)  # a damaged LoRA is refused before anything is written
    _check_export_destination(dst, overwrite)
    with StopSignals() as stop, atomic_directory(dst, lambda d: _check_export_destination(d, overwrite), log) as tmp:
        for name in names:  # one component in memory at a time
            config, params = load_checkpoint(src, components=[name], verify=verify, log=log)[name]
            conv = CONVERTERS[name]
            tensors = conv.to_state_dict(config, params)
            (tmp / name).mkdir()
            data = {"_class_name": conv.diffusers_class, "_diffusers_version": _diffusers_version(),
                    **{k: v for k, v in config_dict(name, config).items() if k != "_class_name"}}
            (tmp / name / "config.json").write_text(json.dumps(data, indent=2) + "\n")
            write_streaming(tmp / name / WEIGHTS_NAME, tensors, None if dtype is None else DTYPES[dtype], stop.check)
            del params, tensors
            check_exported_file(tmp / name, WEIGHTS_NAME, conv.diffusers_class, data)
        text_written = _write_text_encoders(tmp, src, marker, text_out, None if dtype is None else DTYPES[dtype],
                                            verify, stop, log) if text_out else {}
        if whole:
            _write_pipeline(tmp, src, text, text_index, None if lora is None else Path(lora), text_written)
        hashes = {str(p.relative_to(tmp)): file_hash(p) for p in sorted((tmp / "lora").glob("*.safetensors"))}
        stop.check()
        (tmp / EXPORT_MARKER).write_text(json.dumps({"exported_from": str(src.absolute()), "components": names + text_out,
                                                     HASHES_KEY: hashes}, indent=2) + "\n")
    return dst
