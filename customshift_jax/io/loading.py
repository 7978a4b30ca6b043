"""Loading a model from disk, whatever the user points at: one of our checkpoints, a diffusers folder or
pipeline folder, or an original single-file SD3 checkpoint. The I/O layer above the models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.io.checkpoint import is_checkpoint, load_checkpoint
from customshift_jax.io.convert import load_single_file
from customshift_jax.io.diffusers_folder import load_component
from customshift_jax.io.safetensors import safetensors_files
from customshift_jax.models.mmdit.api import Params
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.mapping import params_from_state_dict
from customshift_jax.models.mmdit.options import as_dtype
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.mapping import vae_params_from_state_dict

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def load_transformer(path: str | Path, *, dtype: Any = jnp.float32, config: MMDiTConfig | None = None,
                     verify: bool = True) -> tuple[MMDiTConfig, Params]:
    """(config, params) from a diffusers transformer folder, a pipeline folder (its `transformer/`), one of
    our orbax checkpoints (`customshift convert`), or an original single-file SD3 / SD3.5 `.safetensors`
    (architecture inferred from the shapes unless `config` is given).

    Raises FileNotFoundError / ValueError naming the file or key when the folder is not usable; `verify` checks
    our checkpoint's content hashes.
    """
    dtype = as_dtype(dtype)
    if is_checkpoint(path):
        config, params = load_checkpoint(path, components=["transformer"], verify=verify)["transformer"]
        return config, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    if Path(path).is_file() and Path(path).suffix == ".safetensors":
        config, params = load_single_file(path, "transformer", config=config, dtype=dtype)
        return config, jax.tree_util.tree_map(jnp.asarray, params)
    raw_config, state_dict, folder = load_component(path, "transformer")
    config = MMDiTConfig.from_diffusers_config(raw_config)
    params = params_from_state_dict(config, state_dict, dtype=dtype, what=f"{folder}")
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def _vae_folder(path: Path) -> Path:
    """The folder holding the VAE's config.json: `path` itself, or its `vae/` subfolder for a pipeline."""
    expected = (f"expected a diffusers AutoencoderKL folder ({CONFIG_NAME} + {WEIGHTS_NAME}) "
                "or a pipeline folder with a vae/ subfolder")
    if not path.exists():
        raise FileNotFoundError(f"VAE path {path} does not exist; {expected}")
    if not path.is_dir():
        raise ValueError(f"VAE path {path} is a file; {expected}")
    if (path / "vae").is_dir():
        return path / "vae"
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is a pipeline folder without a vae/ subfolder; {expected}")
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME} and no vae/ subfolder; {expected}")


def load_vae(path: str | Path, *, variant: str | None = None, dtype: Any = None,
             verify: bool = True) -> tuple[VAEConfig, Params]:
    """Read a diffusers `vae/` folder (or a pipeline folder's `vae/`) -> (config, params).

    `variant` picks e.g. diffusion_pytorch_model.fp16.safetensors; `dtype` casts the params (default: as stored);
    `verify` checks our checkpoint's content hashes."""
    if is_checkpoint(path):  # ours, written by `customshift convert`
        config, params = load_checkpoint(path, ["vae"], verify=verify)["vae"]
        return config, (params if dtype is None else jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), params))
    folder = _vae_folder(Path(path))
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; expected a diffusers AutoencoderKL config")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); expected a diffusers AutoencoderKL config") from e
    try:
        config = VAEConfig.from_diffusers_config(raw)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    from safetensors.numpy import load_file  # lazy: the core package imports without safetensors/torch

    state_dict: dict[str, Any] = {}
    name = WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")
    for f in safetensors_files(folder, name):
        state_dict.update(load_file(str(f)))
    try:
        params = vae_params_from_state_dict(config, state_dict)
    except ValueError as e:
        raise ValueError(f"weights in {folder}: {e}") from e
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return config, params
