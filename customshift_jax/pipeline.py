"""The stages of generation: load the components, (prefill the reference), sample, decode, write a PNG.

The pieces are the library's pure functions; `Pipeline` compiles them once for one model, with the weights as call
arguments. `CustomShiftPipeline` (customshift_pipeline.py) puts them in order from a prompt; training samples and
the subject world's methods call `Pipeline` directly, with weights that change or references batched by row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.customshift.branches import PREFILL_AXES, make_prefill
from customshift_jax.customshift.cads import CustomShiftAttnProcessor
from customshift_jax.customshift.sampling import make_customshift_sampler
from customshift_jax.io.checkpoint import is_checkpoint, load_checkpoint_config
from customshift_jax.io.loading import load_transformer, load_vae
from customshift_jax.io.safe_files import read_npz, read_regular_file, save_image
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.models.vae import scale_latents, unscale_latents, vae_decode, vae_encode
from customshift_jax.parallel import sharding as shd
from customshift_jax.sampling import make_sampler
from customshift_jax.text import PromptEmbeds

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


def load_components(path: str | Path, *, text_encoders: str | Path | None = None, verify: bool = True) -> Components:
    """From our orbax checkpoint or a diffusers pipeline folder; text encoders from `text_encoders` or the folder.
    `verify` checks the checkpoint's content hashes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder; give a checkpoint written by "
                                "`customshift convert` or a diffusers SD3 pipeline folder.")
    ours = is_checkpoint(path)
    if not ours and not (path / "model_index.json").exists():
        raise ValueError(f"{path}: neither a customshift checkpoint nor a diffusers pipeline folder "
                         "(no customshift_checkpoint.json, no model_index.json).")
    # our checkpoint's params as stored; a diffusers folder's in float32
    config, params = load_transformer(path, dtype=None if ours else jnp.float32, verify=verify)
    vae_config, vae_params = load_vae(path, verify=verify)
    # SD3's scheduler unless the folder holds one
    scheduler: dict | str = str(path / "scheduler") if (path / "scheduler").is_dir() else {"shift": 3.0}
    text_folder = Path(text_encoders) if text_encoders else None
    if text_folder is None and (path / "text_encoder").is_dir():
        text_folder = path
    params = jax.tree_util.tree_map(jnp.asarray, params)
    vae_params = jax.tree_util.tree_map(jnp.asarray, vae_params)
    return Components(config, params, vae_config, vae_params, scheduler, text_folder)


def read_transformer_config(path: str | Path) -> MMDiTConfig | None:
    """The MMDiT config of a checkpoint or pipeline folder, read without any weights (None when there is none to
    read: the loaders then say what is wrong). For checks that should fail before anything heavy loads."""
    path = Path(path)
    try:
        if is_checkpoint(path):
            return load_checkpoint_config(path, "transformer")
        raw = json.loads((path / "transformer" / "config.json").read_text())
        return MMDiTConfig.from_diffusers_config(raw)
    except (OSError, ValueError, KeyError):
        return None


PROMPTS_MAX_BYTES = 64 << 20  # a --prompts-file larger than this is not a list of prompts


def read_prompts(prompt: str | None, prompts_file: str | Path | None) -> list[str]:
    """The prompts: one `--prompt`, or a file of one prompt a line (blank lines and # comments skipped)."""
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE.")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give the text to generate.")
        return [prompt]
    path = Path(prompts_file)
    data = read_regular_file(path, PROMPTS_MAX_BYTES, "prompts file", f"{PROMPTS_MAX_BYTES >> 20} MiB of prompts")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {path} is not UTF-8 text; give a text file of one prompt a line.") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one prompt a line expected).")
    return prompts


def load_embeds_file(path: str | Path, *, need_subject: bool | None,
                     what: str = "embeddings file") -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """(PromptEmbeds, (subject_embeds, subject_pooled) or None) from an `--embeds` .npz file: the one reader of
    that format. `need_subject`: True, the subject arrays must be there; False, they are not read; None, read
    when present. `what` names the file in messages (the flag or config key it came from)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file (an .npz as `customshift encode` writes: "
                                "prompt_embeds, pooled_prompt_embeds, ...).")
    try:  # through read_npz: a regular file, members bounded (no FIFO, device or zip bomb), each fault one line
        embeds = PromptEmbeds.load_npz(path)
    except KeyError as e:
        raise ValueError(f"{what} {path}: {e.args[0] if e.args else e}") from None
    if need_subject is False:
        return embeds, None
    data = read_npz(path, what)
    missing = [k for k in SUBJECT_ARRAYS if k not in data]
    if missing:
        if need_subject is None:
            return embeds, None
        raise ValueError(f"{what} {path} lacks {', '.join(missing)}, needed with --reference "
                         "unless text encoders are available (--text-encoders).")
    return embeds, (np.asarray(data["subject_embeds"], np.float32),
                    np.asarray(data["subject_pooled_embeds"], np.float32))


def check_size(config: MMDiTConfig, vae_scale: int, height: int, width: int,
               names: tuple[str, str] = ("--height", "--width")) -> None:
    """Height and width must be multiples of vae scale x patch size, and fit the position grid; `names` name them
    in the message (the CLI's flags, or the pipeline's arguments)."""
    unit = vae_scale * config.patch_size
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise ValueError(f"{names[0]} {height} and {names[1]} {width} must be positive multiples of {unit} (VAE scale "
                         f"{vae_scale} x patch size {config.patch_size}).")
    grid = max(height, width) // unit
    if not config.latent_fits(height // vae_scale, width // vae_scale):
        raise ValueError(f"{height}x{width} px needs a {grid}-patch grid, over this model's pos_embed_max_size "
                         f"{config.pos_embed_max_size}; the largest side is {config.pos_embed_max_size * unit} px.")


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_batch_memory(config: MMDiTConfig, vae_scale: int, height: int, width: int, images: int,
                       name: str = "--num-images", text_tokens: int = 0, available: int | None = None) -> None:
    """One prompt's batch (`images` at once) must fit in memory: its float32 noise, latents, decoded pixels and
    the prompt's `text_tokens` embeddings repeated per image (with the negatives) alone; a batch past that is
    refused in one line naming `name`, not a numpy memory error mid-run."""
    per_image = 4 * (2 * config.in_channels * (height // vae_scale) * (width // vae_scale) + 3 * height * width
                     + 2 * (text_tokens * config.joint_attention_dim + config.pooled_projection_dim))
    available = memory_bytes() if available is None else available
    if available and images * per_image > available:
        raise ValueError(f"{name} {images} needs at least {images * per_image / 2**30:.1f} GiB for one prompt's "
                         f"batch ({per_image / 2**10:.0f} KiB of latents, pixels and text per {height}x{width} "
                         f"image), over this machine's {available / 2**30:.1f} GiB; give at most {available // per_image}.")


def check_init_latents(latents: np.ndarray, expected: Sequence[int], what: str) -> None:
    """Initial latents (`what`: "--init-latents FILE", or the pipeline's argument) must have the batch's latent
    shape and hold only finite values."""
    if tuple(latents.shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(latents.shape)}; expected {tuple(expected)} "
                         "(prompts x images per prompt, latent channels, height and width over the VAE scale).")
    bad = int(np.size(latents) - np.isfinite(latents).sum())
    if bad:
        raise ValueError(f"{what} holds {bad} NaN / Inf of {np.size(latents)} values; all must be finite.")


def check_finite_latents(latents: np.ndarray, index: int, total: int) -> None:
    """Stop before decoding when sampling gave NaN / Inf latents: they would decode to a black PNG."""
    bad = int(np.size(latents) - np.isfinite(latents).sum())
    if bad:
        raise ValueError(f"sampling prompt {index + 1} of {total} gave non-finite latents ({bad} of "
                         f"{np.size(latents)} values NaN or Inf); no PNG written for it. Check --guidance, "
                         "--gamma, --lora and the --checkpoint weights.")


def to_pixels(image: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8, rounded half up: what a PNG of the image holds. The one
    conversion: the pipeline's images, the PNGs and the world's judged images all go through it."""
    x = np.moveaxis(np.asarray(image, np.float32), -3, -1)
    return np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """(3, H, W) in [-1, 1] -> PNG with the prompt and settings in its text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = to_pixels(image)
    info = PngInfo()
    info.add_text("prompt", str(metadata.get("prompt", "")))
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    save_image(Image.fromarray(pixels), path, "PNG", pnginfo=info)


class StepProgress:
    """A tqdm bar over sampling steps, fed from inside the jitted loop by `jax.debug.callback`.

    One instance serves many sampler calls: `start` opens a bar, each step advances it, `close` ends it. Inside
    `interruptible()`, Ctrl-C stops the loop after the step in progress (the step callback raises).
    """

    def __init__(self) -> None:
        self._bar = None
        self._signals: int | None = None  # read end of the signal wakeup pipe, inside `interruptible()`
        self.interrupted = False

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C stops the sampler between steps. Inside, SIGINT only sets `interrupted`; each step's callback
        sees it (or, when the main thread waits inside XLA and Python cannot run its handler, the signal's number
        on the wakeup fd the C-level handler writes) and raises, so XLA abandons the loop; leaving, an interrupted
        run raises KeyboardInterrupt. The compiled loop is unchanged: an uninterrupted run gives the same numbers."""
        self.interrupted = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)

        def note(signum, frame):
            self.interrupted = True

        previous_handler = signal.signal(signal.SIGINT, note)
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._signals = read
        try:
            yield self
        finally:
            signal.set_wakeup_fd(previous_fd)
            signal.signal(signal.SIGINT, previous_handler)
            self._signals = None
            os.close(read)
            os.close(write)
        if self.interrupted:
            raise KeyboardInterrupt()

    def _interrupt_requested(self) -> bool:
        fd = self._signals
        if fd is not None:
            try:
                self.interrupted |= signal.SIGINT in os.read(fd, 512)
            except OSError:  # nothing there (EAGAIN), or closed as the loop ended
                pass
        return self.interrupted

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def __call__(self, _index) -> None:
        if self._bar is not None:
            self._bar.update(1)
        if self._interrupt_requested():
            raise KeyboardInterrupt("sampling interrupted between steps")  # XLA stops the loop here

    def close(self) -> None:
        try:
            jax.effects_barrier()  # let the last steps' callbacks land before the bar closes
        except Exception:  # noqa: BLE001 - a loop stopped by Ctrl-C: its callbacks are over
            pass
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Pipeline:
    """Prompt embeddings -> (reference -> cache) -> sampler -> VAE decode, for one model: what
    `CustomShiftPipeline`, training samples and `customshift demo` run.

    The compiled functions are built once (on first use); the weights are call arguments, named as everywhere:
    the base params, and the CustomShift LoRAs `rab` and `cgb` (the CGB's with beta). `lora_config` is
    their `LoRAConfig` (None: no reference path). `options` says how every function runs (`RunOptions`: dtype, the
    attention backend "xla", "blocked", "flash", ...). With `mesh`, every function runs sharded under `rules`.
    """

    def __init__(self, config: MMDiTConfig, vae_config: Any = None, *, lora_config: Any = None, shift: str = "cads",
                 form: str = "two_pass", options: RunOptions | None = None, decode: bool = True,
                 mesh: Any = None, rules: Any = "fsdp", progress: Any = None):
        CustomShiftAttnProcessor(shift, form)  # a bad shift or form fails here, before anything compiles
        if decode and vae_config is None:
            raise ValueError("Pipeline(decode=True) needs the vae_config.")
        self.config, self.vae_config, self.lora_config = config, vae_config, lora_config
        self.shift, self.form, self.decode = shift, form, decode
        self.options = shd.on_mesh(options or RunOptions(), mesh, rules)
        self.mesh, self.rules, self.progress = mesh, rules, progress
        self._built: dict[str, Any] = {}

    def _get(self, name: str, build) -> Any:
        if name not in self._built:
            self._built[name] = build()
        return self._built[name]

    def _sampler_kw(self) -> dict[str, Any]:
        return dict(decode=self.decode, vae_config=self.vae_config, progress=self.progress, mesh=self.mesh,
                    rules=self.rules)

    def plain_sampler(self):
        """The SD3 sampler without a reference (`sampling.make_sampler`, sharded on the mesh if any)."""
        return self._get("plain", lambda: make_sampler(self.config, self.options, **self._sampler_kw()))

    def customshift_sampler(self):
        """The sampler whose forward is the Cross-Guidance Branch reading the reference cache."""
        return self._get("customshift", lambda: make_customshift_sampler(
            self.config, self.lora_config, self.options, shift=self.shift, form=self.form, **self._sampler_kw()))

    def encode_reference(self, vae_params: Any, images: Any) -> jax.Array:
        """Reference images (B, 3, H, W) in [-1, 1] -> scaled VAE latents (B, C, H/f, W/f): what the RAB reads."""
        encode = self._get("encode", lambda: jax.jit(
            lambda p, x: scale_latents(self.vae_config, vae_encode(self.vae_config, p, x))))
        return encode(vae_params, jnp.asarray(images))

    def prefill_function(self):
        """The compiled Reference-Alignment Branch `f(params, rab, ref_latents, subject_embeds, subject_pooled)`."""
        def build():
            prefill = make_prefill(self.config, self.lora_config, self.options)
            if self.mesh is None:
                return jax.jit(prefill)
            return shd.ShardedFunction(prefill, self.mesh, self.rules, *PREFILL_AXES)

        return self._get("prefill", build)

    def reference_cache(self, params: Any, rab: Any, ref_latents: Any, subject_embeds: Any,
                        subject_pooled: Any) -> Any:
        """The Reference-Alignment Branch once: {group: (K, V)} of every layer (`RefCache.kv`)."""
        return self.prefill_function()(params, rab, ref_latents, subject_embeds, subject_pooled)

    def sample(self, params: Any, latents: Any, cond: Any, schedule: Any, *, guidance: float = 1.0,
               cgb: Any = None, ref_kv: Any = None, gamma: float = 1.0, reference_scale: float | None = None,
               vae_params: Any = None, **noise_kw: Any) -> jax.Array:
        """Final latents, or images (B, 3, H, W) in [-1, 1] when the pipeline decodes. Without `ref_kv`: the
        plain SD3 sampler; with it: CustomShift at `gamma`. `latents` None: drawn from `key=` at `height=`,
        `width=` (pixels), as `sampling.make_sampler`'s runner does. `reference_scale`: reference guidance (a
        pass without the reference each step, `customshift.sampling`); None: off."""
        kw = dict(guidance_scale=guidance, vae_params=vae_params, **noise_kw)
        if ref_kv is None:
            return self.plain_sampler()(params, latents=latents, cond=cond, schedule=schedule, **kw)
        return self.customshift_sampler()({"base": params, "cgb": cgb}, latents=latents, cond=cond, schedule=schedule,
                                          extra={"ref_kv": ref_kv, "gamma": np.float32(gamma),
                                                 **({} if reference_scale is None
                                                    else {"reference_scale": np.float32(reference_scale)})}, **kw)

    def decode_latents(self, vae_params: Any, z: Any) -> jax.Array:
        """Final latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (for a pipeline that does not decode)."""
        decode = self._get("decode", lambda: jax.jit(
            lambda p, x: vae_decode(self.vae_config, p, unscale_latents(self.vae_config, x))))
        return decode(vae_params, jnp.asarray(z))
