"""`CustomShiftPipeline`: prompt (and a reference image with its subject's name) to images, as a diffusers user
calls a pipeline. Prompt-to-image is written here once; `customshift generate` is a thin layer over it.

    pipe = CustomShiftPipeline.from_pretrained("ckpt/", lora="runs/dog/lora")
    images = pipe(["a dog on the beach", "a dog in the snow"], reference="dog.jpg", subject="dog").images
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import customshift_jax.pipeline as stages  # looked up at call time: `stages.load_components` can be replaced
from customshift_jax.customshift.cads import SHIFTS
from customshift_jax.io.images import ImageLimits, load_reference_image, reference_pixels, to_rgb
from customshift_jax.io.lora_files import LoRAFiles, fit_lora, read_lora_files
from customshift_jax.io.text_settings import (
    Recorded,
    checkpoint_text_settings,
    combine,
    lora_text_settings,
    recorded_clip_skip,
    resolve_max_sequence_length,
)
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.text import PromptEmbeds

ATTENTIONS = ("xla", "blocked", "flash")
OUTPUT_TYPES = ("pil", "np", "latent")
# jax.random.key keeps only the low 32 bits without jax_enable_x64: a larger seed would repeat another's image.
SEED_MAX = 2**32 - 1


def check_widths(config: MMDiTConfig, embeds: Any, subject: Any, source: Any) -> None:
    """Embeddings of other text encoders fail here, in the user's terms, not inside the sampler."""
    widths = {"prompt_embeds": (np.shape(embeds.prompt_embeds)[-1], config.joint_attention_dim),
              "pooled_prompt_embeds": (np.shape(embeds.pooled_prompt_embeds)[-1], config.pooled_projection_dim)}
    if subject is not None:
        widths["subject_embeds"] = (np.shape(subject[0])[-1], config.joint_attention_dim)
    for name, (got, want) in widths.items():
        if got != want:
            raise ValueError(f"{source}: {name} are {got} wide, this model takes {want}: they were made by other "
                             "text encoders; encode with this model's (customshift encode --text-encoders DIR).")


def text_conditioning(embeds: Any, pooled: Any, negative: Any = None, negative_pooled: Any = None, *,
                      guidance: float) -> Any:
    """The sampler's text input of one batch: the negatives go in only when `guidance` > 1 (classifier-free
    guidance), zeros where none are given (the unconditional input training drops the text to)."""
    from customshift_jax.sampling import Conditioning

    if guidance <= 1:
        return Conditioning(embeds, pooled)
    return Conditioning(embeds, pooled, np.zeros_like(embeds) if negative is None else negative,
                        np.zeros_like(pooled) if negative_pooled is None else negative_pooled)


def sample_from_embeds(steps: "stages.Pipeline", params: Any, cond: Any, schedule: Any, *, guidance: float,
                       latents: Any = None, vae_params: Any = None, rab: Any = None, cgb: Any = None,
                       reference: Any = None, subject: tuple | None = None, ref_kv: Any = None, gamma: float = 1.0,
                       reference_scale: float | None = None, **noise: Any) -> Any:
    """Prompt-to-image below the text encoders, for one batch: with a reference (its VAE latents `reference` and
    the subject name's (embeds, pooled) `subject`, or the `ref_kv` that `steps.reference_cache` made of them
    earlier) the Reference-Alignment Branch's prefill with `rab`, then the CustomShift sampler with `cgb` at
    `gamma` (and reference guidance at `reference_scale`, when given); without one, the plain SD3 sampler.
    Final latents, or images in [-1, 1] when `steps` decodes.
    `CustomShiftPipeline`, training samples and the world's methods all sample through here."""
    if ref_kv is None and reference is not None:
        ref_kv = steps.reference_cache(params, rab, reference, *subject)
    return steps.sample(params, latents, cond, schedule, guidance=guidance, cgb=cgb, ref_kv=ref_kv, gamma=gamma,
                        reference_scale=reference_scale, vae_params=vae_params, **noise)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as_prompts(prompt: Any) -> list[str] | None:
    """`prompt` as a list of non-empty strings (None stays None)."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompt={prompt!r}: expected a string or a non-empty list of strings.")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompt: {bad[0]!r} is not a non-empty string; give the text of each image.")
    return list(prompts)


@dataclasses.dataclass(frozen=True)
class PromptImages:
    """One prompt's images: `latents` (n, C, h, w), the sampler's final latents, and `images` (n, 3, H, W) in
    [-1, 1] (None when not decoded)."""

    index: int
    prompt: str | None
    latents: np.ndarray
    images: np.ndarray | None


@dataclasses.dataclass
class CustomShiftPipelineOutput:
    """`images`: a list of PIL images ("pil"), (N, H, W, 3) float32 in [0, 1] ("np") or the final latents (N, C,
    h, w) ("latent"); N = prompts x images per prompt, prompt by prompt."""

    images: Any


@dataclasses.dataclass(frozen=True)
class _Request:
    """A call's checked arguments and what they resolve to (the text embeddings, the reference pixels)."""

    prompts: list[str] | None
    embeds: PromptEmbeds
    reference: np.ndarray | None  # (1, 3, H, W) in [-1, 1]
    subject_name: str | None  # encoded on a reference-cache miss, when `subject` is None
    subject: Any  # (embeds, pooled) or None
    subject_key: tuple | None  # what the reference cache is made of besides the pixels
    n: int
    steps: int
    guidance: float
    gamma: float
    height: int
    width: int
    seed: int
    latents: np.ndarray | None
    max_sequence_length: int


class CustomShiftPipeline:
    """SD3, or CustomShift with a reference image and its subject's name: text -> (reference cache) -> sampler ->
    VAE decode. Build it with `from_pretrained`; call it with prompts. The compiled functions are built on first
    use and kept; the reference cache (the Reference-Alignment Branch's K/V of every layer) is kept for the last
    (reference, subject) pair, keyed by content, so a second call with the same reference runs no prefill.
    `prefills` counts the prefills run; `steps` is the `pipeline.Pipeline` of compiled stages it runs them with."""

    def __init__(self, components: Any, *, lora: LoRAFiles | None = None, fitted_lora: tuple | None = None,
                 text_backend: str = "auto", text_cache: str | Path | None = None, dtype: Any = "float32",
                 attention: str = "xla", mesh: Any = None, rules: Any = "fsdp", shift: str = "cads",
                 image_limits: ImageLimits = ImageLimits(), progress: bool = True, source: str = "",
                 text_settings: Recorded | None = None, notes: Any = None):
        self.components, self.config, self.source = components, components.config, source
        self.text_settings = text_settings  # what the checkpoint / LoRA record: the text encoding's defaults
        self._notes = notes if isinstance(notes, _Notes) else _Notes(notes)  # each note said once
        self._overrides_said: set[int | None] = set()
        self.lora = lora
        self.lora_config, self.rab, self.cgb = fitted_lora if fitted_lora is not None else fit_lora(lora,
                                                                                                   self.config)
        self.text_folder, self.text_backend, self.text_cache = components.text_folder, text_backend, text_cache
        self.attention, self.mesh, self.rules, self.shift = attention, mesh, rules, shift
        self.image_limits = image_limits
        self.progress = stages.StepProgress() if progress else None
        self.steps = stages.Pipeline(self.config, components.vae_config, lora_config=self.lora_config, shift=shift,
                                     options=RunOptions(dtype=_dtype(dtype), backend=attention), decode=False,
                                     mesh=mesh, rules=rules, progress=self.progress)
        self.params = components.params
        if mesh is not None:
            from customshift_jax.parallel import sharding as shd

            self.params = shd.shard_params(self.params, mesh, rules)
        self._encoder = None
        self._cache: tuple[tuple, Any] | None = None  # (content key, reference K/V)
        self.prefills = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, lora: str | Path | LoRAFiles | None = None, text_backend: str = "auto",
                        dtype: Any = "float32", attention: str = "xla", mesh: Any = None, rules: Any = "fsdp", *,
                        text_encoders: str | Path | None = None, text_cache: str | Path | None = None,
                        shift: str = "cads", verify: bool = True, image_limits: ImageLimits = ImageLimits(),
                        progress: bool = True, notes: Any = None) -> "CustomShiftPipeline":
        """Load our checkpoint (`customshift convert`) or a diffusers SD3 pipeline folder, and the CustomShift LoRA
        folder `lora` (training's `output_dir/lora`; None: the training-free method). Text encoders come from
        `text_encoders` (a diffusers folder) or `path`, on `text_backend` ("auto": jax for our checkpoint holding
        them, torch otherwise), loaded on first use; `text_cache` is a folder of cached prompt embeddings. `dtype`:
        the MMDiT's compute dtype; `attention`: "xla", "blocked" or "flash" (`RunOptions.backend`; flash runs in
        Pallas interpret mode on CPU); `mesh` (a `jax.sharding.Mesh` or "data=2,fsdp=4") runs the MMDiT sharded
        by the rule set `rules`; `shift`: "cads" or "concat" (the baseline); `verify` checks content hashes.
        The text settings the checkpoint and the LoRA record (`io.text_settings`; the LoRA's win) are the
        defaults of every call; `notes` (a callable taking one line; default `warnings.warn`) hears when they
        differ, or when a call overrides them. Every argument is checked, and the LoRA read, before the weights
        load."""
        from customshift_jax.text import TEXT_BACKENDS

        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTIONS)}.")
        if text_backend not in TEXT_BACKENDS:
            raise ValueError(f"text_backend={text_backend!r}: expected one of {', '.join(TEXT_BACKENDS)}.")
        if shift not in SHIFTS:
            raise ValueError(f"shift={shift!r}: expected one of {', '.join(SHIFTS)}.")
        _dtype(dtype)
        mesh = _mesh(mesh, rules)  # a bad mesh or rule set fails before anything loads
        if lora is not None and not isinstance(lora, LoRAFiles):
            lora = read_lora_files(lora, verify=verify)  # damaged or non-finite: fails before the weights load
        fitted = None
        if lora is not None:
            early = stages.read_transformer_config(path)
            # A LoRA of another model fails here, before the weights load; the fitted trees are kept.
            fitted = (early, fit_lora(lora, early)) if early is not None else None
        said = _Notes(notes)
        recorded = combine(checkpoint_text_settings(path), lora_text_settings(lora.folder) if lora else None, said)
        components = stages.load_components(path, text_encoders=text_encoders, verify=verify)
        pipe = cls(components, lora=lora, fitted_lora=fitted[1] if fitted and fitted[0] == components.config else None,
                   text_backend=text_backend, text_cache=text_cache, dtype=dtype, attention=attention, mesh=mesh,
                   rules=rules, shift=shift, image_limits=image_limits, progress=progress, source=str(path),
                   text_settings=recorded, notes=said)
        return pipe

    def max_sequence_length(self, given: int | None = None, flag: str = "max_sequence_length") -> int:
        """The T5 length a call encodes with: `given`, else what the model records, else 256; a `given` that
        differs from the recorded one is said once (through `notes`), naming it as `flag`."""
        if given is not None and given in self._overrides_said:  # e.g. said by the CLI in its flag's name
            return given
        self._overrides_said.add(given)
        return resolve_max_sequence_length(given, self.text_settings, self._notes, flag)

    @property
    def vae_scale(self) -> int:
        return self.components.vae_config.downsample_factor

    def text_encoder(self) -> Any:
        """The text encoders (loaded on first use), through the embeddings cache when `text_cache` is set."""
        if self._encoder is None:
            if self.text_folder is None:
                raise ValueError(f"{self.source} has no text encoders: give text_encoders=PIPELINE_FOLDER to "
                                 "from_pretrained, or prompt_embeds= (and subject_embeds=).")
            from customshift_jax.text import CachedTextEncoder, load_text_encoders

            encoders = load_text_encoders(self.text_folder, backend=self.text_backend)
            self._encoder = CachedTextEncoder(encoders, self.text_cache) if self.text_cache else encoders
        return self._encoder

    def __call__(self, prompt: str | Sequence[str] | None = None, reference: Any = None, subject: str | None = None,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 28, guidance_scale: float = 7.0, gamma: float = 1.0,
                 height: int | None = None, width: int | None = None, seed: int = 0, output_type: str = "pil", *,
                 prompt_embeds: PromptEmbeds | None = None, subject_embeds: Any = None, latents: Any = None,
                 max_sequence_length: int | None = None) -> CustomShiftPipelineOutput:
        """Images of `prompt` (a string or a list), with CustomShift when `reference` (an image file, a PIL image
        or a uint8 (H, W, 3) array) and `subject` (its name, e.g. "dog") are given: one prefill serves every
        prompt, and the next call with the same reference and subject reuses it. `gamma` is the reference strength
        (0 ignores it); `guidance_scale` <= 1 turns classifier-free guidance off; height and width default to
        the model's native size (1024 px for SD3). Image j of prompt i comes from the noise of
        `jax.random.fold_in(jax.random.key(seed), i)`, as `customshift generate --seed` draws it.
        `prompt_embeds` (a `PromptEmbeds`) and `subject_embeds` ((1, S, J), (1, P)) replace the text encoders;
        `latents` (N, C, h, w) replace the seeded noise. `max_sequence_length` (T5 tokens) defaults to what the
        model records (`self.text_settings`), else 256; another value is warned about. Every argument is checked
        before anything compiles."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}.")
        results = list(self.each_prompt(
            prompt, reference, subject, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
            gamma, height, width, seed, prompt_embeds=prompt_embeds, subject_embeds=subject_embeds, latents=latents,
            max_sequence_length=max_sequence_length, decode=output_type != "latent"))
        if output_type == "latent":
            return CustomShiftPipelineOutput(np.concatenate([r.latents for r in results]))
        images = np.concatenate([r.images for r in results])
        if output_type == "np":
            return CustomShiftPipelineOutput(np.clip((images.transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0))
        from PIL import Image

        return CustomShiftPipelineOutput([Image.fromarray(stages.to_pixels(x)) for x in images])

    def each_prompt(self, prompt: Any = None, reference: Any = None, subject: str | None = None,
                    negative_prompt: Any = None, num_images_per_prompt: int = 1, num_inference_steps: int = 28,
                    guidance_scale: float = 7.0, gamma: float = 1.0, height: int | None = None,
                    width: int | None = None, seed: int = 0, *, prompt_embeds: PromptEmbeds | None = None,
                    subject_embeds: Any = None, latents: Any = None, max_sequence_length: int | None = None,
                    decode: bool = True) -> Iterator[PromptImages]:
        """`__call__`'s work as `PromptImages`, one prompt at a time (so a caller can save each as it comes).
        The arguments are checked, the text encoded and the reference cache made now; the sampling runs as the
        iterator is read."""
        request = self._request(prompt, reference, subject, negative_prompt, num_images_per_prompt,
                                num_inference_steps, guidance_scale, gamma, height, width, seed, prompt_embeds,
                                subject_embeds, latents, max_sequence_length)
        ref_kv = self._reference_cache(request) if request.reference is not None else None
        return self._sample_each(request, ref_kv, decode)

    # ------------------------------------------------------------------------------------------------ internals
    def _request(self, prompt, reference, subject, negative_prompt, n, steps, guidance, gamma, height, width, seed,
                 prompt_embeds, subject_embeds, latents, max_sequence_length) -> _Request:
        """Check every argument (no compile yet), read the reference, then encode the text."""
        prompts = _as_prompts(prompt)
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt= (text) or prompt_embeds= (a PromptEmbeds).")
        if prompt_embeds is not None and not isinstance(prompt_embeds, PromptEmbeds):
            raise ValueError(f"prompt_embeds: expected a customshift_jax.text.PromptEmbeds, got "
                             f"{type(prompt_embeds).__name__}.")
        if prompt_embeds is not None and negative_prompt is not None:
            raise ValueError("negative_prompt= goes with prompt=; with prompt_embeds= give the negatives in it.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if (not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts)
                    or not all(isinstance(p, str) for p in negative_prompt)):
                raise ValueError(f"negative_prompt: expected a string or a list of {len(prompts)} strings (one a "
                                 "prompt).")
        if subject is not None and (not isinstance(subject, str) or not subject.strip()):
            raise ValueError(f"subject={subject!r}: give the subject's name, e.g. 'dog'.")
        if reference is None and (subject is not None or subject_embeds is not None):
            raise ValueError("subject= is given without reference= (the subject's image).")
        if reference is not None and (subject is None) == (subject_embeds is None):
            raise ValueError("reference= needs exactly one of subject= (the subject's name, e.g. 'dog') or "
                             "subject_embeds=.")
        for name, value in (("num_images_per_prompt", n), ("num_inference_steps", steps)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a whole number >= 1.")
        if not _is_real(guidance) or not math.isfinite(guidance):
            raise ValueError(f"guidance_scale={guidance!r}: expected a finite number (<= 1 turns guidance off).")
        if not _is_real(gamma) or not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma={gamma!r}: expected a finite number >= 0 (0 ignores the reference, 1 is the "
                             "default, larger follows it more).")
        if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
            raise ValueError(f"seed={seed!r}: expected a whole number from 0 to {SEED_MAX} (2**32 - 1); JAX's "
                             "random key keeps only 32 bits.")
        if max_sequence_length is not None and (not _is_int(max_sequence_length)
                                                or not 1 <= max_sequence_length <= 512):
            raise ValueError(f"max_sequence_length={max_sequence_length!r}: expected a whole number from 1 to 512.")
        if prompt_embeds is None or subject is not None:
            max_sequence_length = self.max_sequence_length(max_sequence_length)
        native = self.config.sample_size * self.vae_scale
        height, width = native if height is None else height, native if width is None else width
        if not _is_int(height) or not _is_int(width):
            raise ValueError(f"height={height!r}, width={width!r}: expected whole numbers of pixels.")
        stages.check_size(self.config, self.vae_scale, height, width, names=("height", "width"))
        n_prompts = len(prompts) if prompts is not None else int(np.shape(prompt_embeds.prompt_embeds)[0])
        shape = (n_prompts * n, self.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            stages.check_init_latents(latents, shape, "latents")
        pixels = self._reference_pixels(reference, height, width) if reference is not None else None
        if subject_embeds is not None:
            subject_embeds = _subject_arrays(subject_embeds)
        if prompt_embeds is None and self.text_folder is None:
            self.text_encoder()  # says what to give instead
        embeds = prompt_embeds
        if embeds is None:
            negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, (list, tuple)) \
                else list(negative_prompt)
            embeds = self.text_encoder().encode(prompts, negatives, max_sequence_length=max_sequence_length,
                                                do_classifier_free_guidance=guidance > 1,
                                                clip_skip=recorded_clip_skip(self.text_settings))
        check_widths(self.config, embeds, subject_embeds, "prompt_embeds" if prompt_embeds is not None else
                     f"the text encoders of {self.text_folder}")
        stages.check_batch_memory(self.config, self.vae_scale, height, width, n, name="num_images_per_prompt",
                                  text_tokens=int(np.shape(embeds.prompt_embeds)[1]))
        if guidance > 1 and not embeds.has_negative:
            raise ValueError(f"guidance_scale={guidance} > 1 needs negative embeddings; prompt_embeds has none (or "
                             "use guidance_scale=1).")
        subject_key = None
        if pixels is not None:
            subject_key = ("text", subject, max_sequence_length) if subject is not None else (
                "embeds", _digest(*subject_embeds))
        return _Request(prompts, embeds, pixels, subject, subject_embeds, subject_key, n, steps, float(guidance),
                        float(gamma), height, width, int(seed), latents, max_sequence_length)

    def _reference_pixels(self, reference: Any, height: int, width: int) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] from an image file, a PIL image or a uint8 (H, W, 3) array."""
        if isinstance(reference, (str, Path)):
            return load_reference_image(reference, height, width, self.image_limits)
        if isinstance(reference, np.ndarray):
            if reference.dtype != np.uint8 or reference.ndim != 3 or reference.shape[-1] != 3:
                raise ValueError(f"reference: an array must be uint8 (H, W, 3), got {reference.dtype} "
                                 f"{reference.shape}.")
            from PIL import Image

            reference = Image.fromarray(reference)
        if not hasattr(reference, "convert") or not hasattr(reference, "size"):
            raise ValueError(f"reference: expected an image file path, a PIL image or a uint8 (H, W, 3) array, got "
                             f"{type(reference).__name__}.")
        return reference_pixels(to_rgb(reference), height, width)

    def _reference_cache(self, request: _Request) -> Any:
        """The reference K/V of every layer: the kept one when the reference pixels and subject are the same."""
        key = (_digest(request.reference), request.subject_key)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # free the old one before making the new
        subject = request.subject
        if subject is None:
            s = self.text_encoder().encode([request.subject_name], max_sequence_length=request.max_sequence_length,
                                           do_classifier_free_guidance=False,
                                           clip_skip=recorded_clip_skip(self.text_settings))
            subject = (s.prompt_embeds, s.pooled_prompt_embeds)
            check_widths(self.config, request.embeds, subject, f"the text encoders of {self.text_folder}")
        latents = self.steps.encode_reference(self.components.vae_params, request.reference)
        ref_kv = self.steps.reference_cache(self.params, self.rab, latents, *subject)
        self.prefills += 1
        self._cache = (key, ref_kv)
        return ref_kv

    def _sample_each(self, r: _Request, ref_kv: Any, decode: bool) -> Iterator[PromptImages]:
        """Sample (and decode) prompt by prompt: image j of prompt i from fold_in(key(seed), i)'s noise."""
        import jax

        from customshift_jax.sampling import make_schedule

        config, scale = self.config, self.vae_scale
        schedule = make_schedule(self.components.scheduler, r.steps, image_seq_len=(
            r.height // scale // config.patch_size) * (r.width // scale // config.patch_size))
        key = jax.random.key(r.seed)
        e, n = r.embeds, r.n
        count = int(np.shape(e.prompt_embeds)[0])
        for i in range(count):
            pick = lambda a: None if a is None else np.repeat(np.asarray(a)[i:i + 1], n, axis=0)  # noqa: E731
            cond = text_conditioning(pick(e.prompt_embeds), pick(e.pooled_prompt_embeds), pick(
                e.negative_prompt_embeds), pick(e.negative_pooled_prompt_embeds), guidance=r.guidance)
            if self.progress is not None:
                self.progress.start(r.steps, f"prompt {i + 1}/{count}")
            noise = dict(latents=r.latents[i * n:(i + 1) * n]) if r.latents is not None else dict(
                latents=None, key=jax.random.fold_in(key, i), height=r.height, width=r.width)
            try:  # with a progress bar, Ctrl-C stops the loop between steps (StepProgress.interruptible)
                with self.progress.interruptible() if self.progress is not None else contextlib.nullcontext():
                    z = sample_from_embeds(self.steps, self.params, cond, schedule, guidance=r.guidance,
                                           cgb=self.cgb, ref_kv=ref_kv, gamma=r.gamma, **noise)
                    z = jax.block_until_ready(z)
            except Exception:
                if self.progress is not None and self.progress.interrupted:
                    raise KeyboardInterrupt() from None
                raise
            finally:
                if self.progress is not None:
                    self.progress.close()
            z = np.asarray(z)
            stages.check_finite_latents(z, i, count)  # NaN latents would decode to a black image
            images = np.asarray(self.steps.decode_latents(self.components.vae_params, z)) if decode else None
            yield PromptImages(i, r.prompts[i] if r.prompts else None, z, images)


class _Notes:
    """Says each note once: through `say` (one line), or `warnings.warn` when there is none."""

    def __init__(self, say: Any = None):
        self.say, self.said = say, set()

    def __call__(self, message: str) -> None:
        if message in self.said:
            return
        self.said.add(message)
        if self.say is None:
            warnings.warn(message, UserWarning, stacklevel=4)
        else:
            self.say(message)


def _dtype(dtype: Any) -> Any:
    from customshift_jax.models.mmdit.options import as_dtype

    try:
        return as_dtype(dtype)
    except ValueError as e:
        raise ValueError(f"dtype: {e}") from None


def _mesh(mesh: Any, rules: Any) -> Any:
    """A `jax.sharding.Mesh` from a Mesh or "data=2,fsdp=4" (checked with `rules`), or None."""
    if mesh is None:
        return None
    from customshift_jax.parallel import sharding as shd

    shd.as_rules(rules)  # an unknown rule set fails here, naming the known ones
    return shd.make_mesh(**shd.parse_mesh(mesh)) if isinstance(mesh, str) else mesh


def _subject_arrays(subject_embeds: Any) -> tuple[np.ndarray, np.ndarray]:
    """subject_embeds as ((1, S, J), (1, P)) float32."""
    try:
        embeds, pooled = (np.asarray(a, np.float32) for a in subject_embeds)
    except (TypeError, ValueError):
        raise ValueError("subject_embeds: expected a pair (embeds (1, S, J), pooled (1, P)).") from None
    if embeds.ndim != 3 or pooled.ndim != 2 or embeds.shape[0] != 1 or pooled.shape[0] != 1:
        raise ValueError(f"subject_embeds: expected (1, S, J) and (1, P), got {embeds.shape} and {pooled.shape}.")
    return embeds, pooled


def _digest(*arrays: np.ndarray) -> str:
    """A content key of arrays: shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
