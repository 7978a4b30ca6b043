"""Find and read diffusers component folders on disk: config.json plus (sharded) safetensors weights."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np

from customshift_jax.io.safetensors import SafetensorsFile, safetensors_files

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class LazyStateDict(Mapping):
    """A state dict over one or more safetensors files; a value is read (memory-mapped) when accessed."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for key in st.keys():
                self._where[key] = st

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def nbytes(self) -> int:
        return sum(int(np.prod(st.shape(k), dtype=np.int64)) * st.dtype(k).itemsize for k, st in self._where.items())


def component_folder(path: str | Path, component: str) -> Path:
    """`path` itself if it is a component folder, or `path/component` for a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder.")
    if (path / component / "config.json").exists():
        return path / component
    if (path / "config.json").exists():
        return path
    if (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path}: a pipeline folder without a {component}/ component (no "
                                f"{component}/config.json).")
    raise FileNotFoundError(f"{path}: neither a diffusers {component} folder (config.json + {WEIGHTS_NAME}) "
                            f"nor a pipeline folder with {component}/.")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a file that is not JSON is an error naming it."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; expected JSON.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers component folder (single or sharded with an index)."""
    return safetensors_files(folder, WEIGHTS_NAME)


def load_component(path: str | Path, component: str) -> tuple[dict, LazyStateDict, Path]:
    """(config dict, lazy state dict, folder) of a diffusers component in a component or pipeline folder."""
    folder = component_folder(path, component)
    return read_json(folder / "config.json"), LazyStateDict(weight_files(folder)), folder
