"""The tiny SD3 of the subject world: the real SD3 structure (MMDiT with joint blocks, AdaLN, qk RMS norm and
the `context_pre_only` last block; the SD3 VAE; CLIP-L, CLIP-G and T5) at a width that trains on 2 CPU cores.

Sizes, and why: 32 px images (the world's smallest readable size); a VAE with two blocks (one 2x downsampling:
the patterns are 3-5 px, a deeper VAE of this width blurs them) and 4 latent channels, so the MMDiT sees 16x16
latents = 64 tokens at patch 2; VAE widths 16 and 32, since on 2 cores a training step of twice that width
takes twice the time; short tokenizer lengths (16 CLIP + 20 T5 tokens: the longest caption is 14 and 18 tokens long).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from customshift_jax.testing.tiny_pipeline import DEFAULT_TRANSFORMER_CONFIG, DEFAULT_VAE_CONFIG, build_tiny_pipeline
from customshift_jax.toyworld import world

IMAGE_SIZE = 32
LATENT_SHAPE = (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)  # (C, h, w) of the world VAE's latents
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 20

# The tiny pipeline's MMDiT (its text widths: T5 96, pooled CLIP-L + CLIP-G 80) at the world's size.
TRANSFORMER_CONFIG: dict[str, Any] = {**DEFAULT_TRANSFORMER_CONFIG, "sample_size": 16, "in_channels": 4,
                                      "out_channels": 4, "num_layers": 4, "attention_head_dim": 32,
                                      "num_attention_heads": 4, "caption_projection_dim": 128, "qk_norm": "rms_norm"}

# The tiny pipeline's SD3 VAE (no quant convs) at the world's widths; scaling and shift are set from the trained
# VAE's latents (1 / std and the mean) by `vae_train`.
VAE_CONFIG: dict[str, Any] = {**DEFAULT_VAE_CONFIG, "block_out_channels": [16, 32], "layers_per_block": 1,
                              "latent_channels": 4, "norm_num_groups": 8, "sample_size": IMAGE_SIZE,
                              "scaling_factor": 1.0, "shift_factor": 0.0}


def build_world_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A diffusers SD3 pipeline folder of the world's shape: random MMDiT and VAE (trained later), frozen random
    text encoders whose tokenizers are trained on every caption of the world."""
    return build_tiny_pipeline(path, transformer_config=TRANSFORMER_CONFIG, vae_config=VAE_CONFIG, seed=seed,
                               sentences=world.sentences() * 4, clip_max_length=CLIP_MAX_LENGTH,
                               t5_tokenizer=("bpe", 150))
