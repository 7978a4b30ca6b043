"""Tiny random metric models for tests: a CLIPModel folder (with processor) and a DINO-style ViTModel folder.

They keep the real structure (CLIP's two towers and projections, ViT with CLS token at 224 px, patch 16) at a
few thousand parameters; `customshift eval --clip / --dino` reads them like the real ones.
"""
from __future__ import annotations

from pathlib import Path

from customshift_jax.testing.tiny_pipeline import (
    CLIP_MAX_LENGTH,
    _clip_vocab_and_merges,
    _quiet_hf,
    _write_clip_tokenizer,
    training_sentences,
)


def build_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random CLIPModel (ViT tower patch 8, text tower 2 layers, projection 16) with its CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    vocab, merges = _clip_vocab_and_merges(training_sentences(), vocab_size=600)
    tok = _write_clip_tokenizer(folder, vocab, merges, pad_token="<|endoftext|>")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                               "width": image_size})
    with _quiet_hf():
        model.save_pretrained(folder)
        CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def build_tiny_dino(folder: str | Path, seed: int = 0) -> Path:
    """A random ViTModel as DINO ViT-S/16 is laid out (224 px, patch 16, CLS token), 2 layers of width 32."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=224, patch_size=16)
    model = ViTModel(config, add_pooling_layer=False).eval()
    with _quiet_hf():
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder
