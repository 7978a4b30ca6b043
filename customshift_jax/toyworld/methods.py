"""The methods the world compares, each a jit-compiled sampler built once: the base model from text only, the
training-free concatenation (zero LoRA, `shift="concat"`), the trained token-competition baseline, and
CustomShift at any gamma (a jit input: one compile serves every gamma)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.customshift_pipeline import sample_from_embeds, text_conditioning
from customshift_jax.io.lora_files import from_state_dict, load_lora_files
from customshift_jax.io.text_settings import checkpoint_text_settings, lora_text_settings, stderr_note
from customshift_jax.pipeline import Pipeline, load_components, to_pixels
from customshift_jax.sampling.schedule import make_schedule
from customshift_jax.text import TextEncoders
from customshift_jax.toyworld.tiny_sd3 import T5_MAX_LENGTH
from customshift_jax.toyworld.vae_train import to_model_images

WEIGHTS = Path(__file__).resolve().parent / "weights"
STEPS = 20
GUIDANCE = 3.0  # CFG: the third build's base draws the named silhouette in 0.90 of images without it, 1.00 with it
SCHEDULER_SHIFT = 1.0  # 64-token images: SD3's 3.0 suits 4096 tokens, 1.0 (no shift) these

# name -> (LoRA folder under WEIGHTS, shift, whether the LoRA is zeroed): the methods the world compares. The
# training-free concatenation runs the trained baseline's sampler with every LoRA weight zero (B = 0 adds
# exactly nothing), so it shares that compile.
METHODS: dict[str, tuple[str | None, str | None, bool]] = {
    "text only": (None, None, False),
    "concat (training-free)": ("concat", "concat", True),
    "concat (trained)": ("concat", "concat", False),
    "joint (trained)": ("joint", "joint", False),  # OminiControl-style: text queries read the reference too
    "customshift ref-guided": ("customshift", "cads", False),
    "customshift": ("customshift", "cads", False),
}
# Methods that sample with reference guidance, and its scale: each step also runs without the reference and
# moves s times as far along (with - without) (`customshift.sampling`); at gamma 1.
REFERENCE_GUIDED: dict[str, float] = {"customshift ref-guided": 2.0}


@dataclasses.dataclass
class WorldModel:
    """The shipped tiny SD3 of the world and its trained LoRAs: everything generation needs, loaded once."""

    config: Any
    params: Any
    vae_config: Any
    vae_params: Any
    encoders: Any
    loras: dict[str, tuple[Any, Any, Any]]  # name -> (LoRAConfig, rab tree, cgb tree incl. beta)
    max_sequence_length: int = T5_MAX_LENGTH  # T5 tokens: what weights/model records it was trained with
    _encode: Any = dataclasses.field(default=None, repr=False)  # a Pipeline for the VAE encoder, on first use

    @classmethod
    def load(cls, weights: str | Path = WEIGHTS) -> "WorldModel":
        """Read `weights/model` (our checkpoint with the text encoders beside it) and `weights/<lora>/`; prompts are
        encoded at the T5 length the model records (a LoRA that records another is said on stderr)."""
        weights = Path(weights)
        if not (weights / "model").is_dir():
            raise FileNotFoundError(f"{weights}/model: no world model here; rebuild it with "
                                    "`python -m customshift_jax.toyworld.build WORK --ship`.")
        comps = load_components(weights / "model")
        loras = {}
        for name in sorted({m[0] for m in METHODS.values() if m[0]}):
            if not (weights / name).is_dir():  # weights built before that method: its columns are left out
                continue
            state_dict, lora = load_lora_files(weights / name)
            loras[name] = (lora, *from_state_dict(comps.config, lora, state_dict))
        encoders = TextEncoders.from_pretrained(comps.text_folder)
        recorded = checkpoint_text_settings(weights / "model")
        length = recorded.settings.max_sequence_length if recorded else T5_MAX_LENGTH
        for name in loras:  # one encoding serves every method: the model's
            lora_record = lora_text_settings(weights / name)
            if lora_record and lora_record.settings.max_sequence_length != length:
                stderr_note(f"the {name} LoRA was trained with T5 length {lora_record.settings.max_sequence_length} "
                            f"({lora_record.source}), the model with {length}; every method encodes at {length}.")
        return cls(comps.config, comps.params, comps.vae_config, comps.vae_params, encoders, loras, length)

    def methods(self) -> list[str]:
        """The methods these weights can run: every one whose LoRA folder is there (`METHODS`' order)."""
        return [m for m, (lora_name, _, _) in METHODS.items() if lora_name is None or lora_name in self.loras]

    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeds (N, 36, 96), pooled (N, 80)) of captions or subject names, float32."""
        return self.encoders.encode_batch(list(texts), max_sequence_length=self.max_sequence_length)

    def encode_images(self, images: np.ndarray) -> jax.Array:
        """uint8 (N, 32, 32, 3) -> scaled VAE latents (N, 4, 16, 16): what the RAB reads."""
        if self._encode is None:  # one pipeline per model: its encoder compiles once, not once per call
            self._encode = Pipeline(self.config, self.vae_config, decode=False)
        return self._encode.encode_reference(self.vae_params, to_model_images(images))


class Generator:
    """One pipeline per LoRA over one world model; `run(method, ...)` returns uint8 images."""

    def __init__(self, model: WorldModel, *, steps: int = STEPS, guidance: float = GUIDANCE):
        self.model, self.guidance = model, guidance
        self.schedule = make_schedule({"shift": SCHEDULER_SHIFT}, steps)
        self.base = Pipeline(model.config, model.vae_config)
        self.pipes = {lora_name: Pipeline(model.config, model.vae_config, lora_config=model.loras[lora_name][0],
                                          shift=shift)
                      for lora_name, shift, _ in METHODS.values() if lora_name in model.loras}
        # The training-free method's all-zero LoRAs, made once.
        self.zeroed = {name: (model.loras[name][0], *jax.tree_util.tree_map(jnp.zeros_like, model.loras[name][1:]))
                       for name, _, zeroed in METHODS.values() if zeroed and name in model.loras}

    def run(self, method: str, noise: jax.Array, prompt: tuple[np.ndarray, np.ndarray], *,
            reference: jax.Array | None = None, subject: tuple[np.ndarray, np.ndarray] | None = None,
            gamma: float = 1.0) -> np.ndarray:
        """Images (B, 32, 32, 3) uint8 of `method` from noise (B, 4, 16, 16), prompt embeddings, and for the
        reference methods the reference latents (B, 4, 16, 16) and the subject name's embeddings."""
        if method not in self.model.methods():
            raise ValueError(f"unknown method {method!r}; these weights run {self.model.methods()}.")
        cond = text_conditioning(*prompt, guidance=self.guidance)  # negatives: zeros, as training drops the text
        lora_name, shift, zeroed = METHODS[method]
        m = self.model
        if shift is None:
            return to_pixels(sample_from_embeds(self.base, m.params, cond, self.schedule, guidance=self.guidance,
                                               latents=noise, vae_params=m.vae_params))
        _, rab, cgb = self.zeroed[lora_name] if zeroed else m.loras[lora_name]
        return to_pixels(sample_from_embeds(self.pipes[lora_name], m.params, cond, self.schedule,
                                           guidance=self.guidance, latents=noise, vae_params=m.vae_params, rab=rab,
                                           cgb=cgb, reference=reference, subject=subject, gamma=gamma,
                                           reference_scale=REFERENCE_GUIDED.get(method)))

