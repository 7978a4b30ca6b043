"""End-to-end generation: load the components, encode the text, (prefill the reference), sample, decode.

The pieces are the library's pure functions; this module only wires them for `customshift generate`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.config import MMDiTConfig

SUBJECT_ARRAYS = ("subject_embeds", "subject_pooled_embeds")


@dataclasses.dataclass
class Components:
    """What generation needs from a checkpoint: MMDiT, VAE, scheduler config, and where text encoders are."""

    config: MMDiTConfig
    params: Any
    vae_config: Any
    vae_params: Any
    scheduler: dict | str
    text_folder: Path | None


def load_components(path: str | Path, *, text_encoders: str | Path | None = None) -> Components:
    """From our orbax checkpoint or a diffusers pipeline folder; text encoders from `text_encoders` or the folder."""
    from customshift_jax.checkpoint import is_checkpoint, load_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder; give a checkpoint written by "
                                "`customshift convert` or a diffusers SD3 pipeline folder.")
    if is_checkpoint(path):
        parts = load_checkpoint(path, ["transformer", "vae"])
        (config, params), (vae_config, vae_params) = parts["transformer"], parts["vae"]
        scheduler: dict | str = {"shift": 3.0}  # SD3's scheduler; the checkpoint stores none
        if (path / "scheduler").is_dir():
            scheduler = str(path / "scheduler")
    else:
        from customshift_jax.api import load_transformer
        from customshift_jax.vae import load_vae

        if not (path / "model_index.json").exists():
            raise ValueError(f"{path}: neither a customshift checkpoint nor a diffusers pipeline folder "
                             "(no customshift_checkpoint.json, no model_index.json).")
        config, params = load_transformer(path)
        vae_config, vae_params = load_vae(path)
        scheduler = str(path / "scheduler") if (path / "scheduler").is_dir() else {"shift": 3.0}
    text_folder = Path(text_encoders) if text_encoders else None
    if text_folder is None and (path / "text_encoder").is_dir():
        text_folder = path
    params = jax.tree_util.tree_map(jnp.asarray, params)
    vae_params = jax.tree_util.tree_map(jnp.asarray, vae_params)
    return Components(config, params, vae_config, vae_params, scheduler, text_folder)


def read_prompts(prompt: str | None, prompts_file: str | Path | None) -> list[str]:
    """The prompts: one `--prompt`, or a file of one prompt a line (blank lines and # comments skipped)."""
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE.")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give the text to generate.")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path}: no such file.")
    lines = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one prompt a line expected).")
    return prompts


def load_embeds_file(path: str | Path, *, need_subject: bool) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """(PromptEmbeds, (subject_embeds, subject_pooled) or None) from an `--embeds` .npz file."""
    from customshift_jax.text import PromptEmbeds

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path}: no such file.")
    try:
        embeds = PromptEmbeds.load_npz(path)
    except KeyError as e:
        raise ValueError(f"embeddings file {path}: {e.args[0] if e.args else e}") from None
    subject = None
    with np.load(path) as data:
        present = [k for k in SUBJECT_ARRAYS if k in data]
        if need_subject:
            if len(present) != 2:
                missing = [k for k in SUBJECT_ARRAYS if k not in data]
                raise ValueError(f"embeddings file {path} lacks {', '.join(missing)}, needed with --reference "
                                 "unless text encoders are available (--text-encoders).")
            subject = (np.asarray(data["subject_embeds"], np.float32), np.asarray(data["subject_pooled_embeds"],
                                                                                  np.float32))
    return embeds, subject


def check_size(config: MMDiTConfig, vae_scale: int, height: int, width: int) -> None:
    """Height and width must be multiples of vae scale x patch size, and fit the position grid."""
    unit = vae_scale * config.patch_size
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise ValueError(f"--height {height} and --width {width} must be positive multiples of {unit} (VAE scale "
                         f"{vae_scale} x patch size {config.patch_size}).")
    grid = max(height, width) // unit
    if grid > config.pos_embed_max_size:
        raise ValueError(f"{height}x{width} px needs a {grid}-patch grid, over this model's pos_embed_max_size "
                         f"{config.pos_embed_max_size}; the largest side is {config.pos_embed_max_size * unit} px.")


def check_init_latents(latents: np.ndarray, expected: Sequence[int], path: str | Path) -> None:
    """--init-latents must have the batch's latent shape and hold only finite values."""
    if tuple(latents.shape) != tuple(expected):
        raise ValueError(f"--init-latents {path} has shape {tuple(latents.shape)}; expected {tuple(expected)} "
                         "(batch = prompts x images per prompt, 16 latent channels, height/8, width/8).")
    bad = int(np.size(latents) - np.isfinite(latents).sum())
    if bad:
        raise ValueError(f"--init-latents {path} holds {bad} NaN / Inf of {np.size(latents)} values; all must be "
                         "finite.")


def check_finite_latents(latents: np.ndarray, index: int, total: int) -> None:
    """Stop before decoding when sampling gave NaN / Inf latents: they would decode to a black PNG."""
    bad = int(np.size(latents) - np.isfinite(latents).sum())
    if bad:
        raise ValueError(f"sampling prompt {index + 1} of {total} gave non-finite latents ({bad} of "
                         f"{np.size(latents)} values NaN or Inf); no PNG written for it. Check --guidance, "
                         "--gamma, --lora and the --checkpoint weights.")


def save_png(image: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """(3, H, W) in [-1, 1] -> PNG with the prompt and settings in its text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = np.clip((np.asarray(image, np.float32).transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    info = PngInfo()
    info.add_text("prompt", str(metadata.get("prompt", "")))
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    Image.fromarray(pixels).save(path, pnginfo=info)


class StepProgress:
    """A tqdm bar over sampling steps, fed from inside the jitted loop by `jax.debug.callback`.

    One instance serves many sampler calls: `start` opens a bar, each step advances it, `close` ends it.
    """

    def __init__(self) -> None:
        self._bar = None

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def __call__(self, _index) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        jax.effects_barrier()  # let the last steps' callbacks land before the bar closes
        if self._bar is not None:
            self._bar.close()
            self._bar = None
