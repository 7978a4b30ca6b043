"""The tiny SD3 folder loads with diffusers offline and runs; its widths follow SD3's constraints."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


from customshift_jax.testing import (  # noqa: E402
    DEFAULT_TRANSFORMER_CONFIG,
    TINY_POOLED_WIDTH,
    TINY_T5_WIDTH,
    build_tiny_pipeline,
    load_pipeline,
    null_components,
)


def test_folder_layout_and_widths(tiny_pipeline_dir, tiny_sd3_pipe):
    for name in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                 "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (tiny_pipeline_dir / name).is_dir(), name
    assert (tiny_pipeline_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_pipeline_dir / "tokenizer" / "merges.txt").is_file()
    assert (tiny_pipeline_dir / "tokenizer_3" / "spiece.model").is_file()
    pipe = tiny_sd3_pipe
    t_cfg = pipe.transformer.config
    assert t_cfg.joint_attention_dim == pipe.text_encoder_3.config.d_model == TINY_T5_WIDTH
    assert t_cfg.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    ) == TINY_POOLED_WIDTH
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size <= TINY_T5_WIDTH
    assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == pipe.tokenizer_max_length == 77
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 2
    assert pipe.vae.config.scaling_factor == 1.5305 and pipe.vae.config.shift_factor == 0.0609
    assert not pipe.vae.config.use_quant_conv and not pipe.vae.config.use_post_quant_conv
    assert pipe.scheduler.config.shift == 3.0
    for key, value in DEFAULT_TRANSFORMER_CONFIG.items():
        got = t_cfg[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_tokenizers_are_clip_and_t5_like(tiny_sd3_pipe):
    pipe = tiny_sd3_pipe
    tok = pipe.tokenizer
    ids = tok("a sks dog wearing a santa hat!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids)[1:4] == ["a</w>", "sks</w>", "dog</w>"]
    assert tok.unk_token_id not in ids[1:-1]  # every byte is in the vocabulary
    assert pipe.tokenizer_2.pad_token == "!"  # as SD3's CLIP-G tokenizer
    assert pipe.text_encoder.config.eos_token_id == tok.eos_token_id
    t5 = pipe.tokenizer_3
    ids = t5("a dog on the beach").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0 and t5.unk_token_id not in ids
    assert len(t5) <= pipe.text_encoder_3.config.vocab_size


def test_pipeline_runs_two_steps(tiny_sd3_pipe):
    out = tiny_sd3_pipe(
        "a sks dog on the beach",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=32,
    )
    latents = out.images
    assert latents.shape == (1, 16, 8, 8)
    assert torch.isfinite(latents).all()


def test_without_text_encoders_loads_and_runs(tiny_pipeline_dir_no_text):
    index = json.loads((tiny_pipeline_dir_no_text / "model_index.json").read_text())
    names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    for name in names:
        assert index[name] == [None, None], name
        assert not (tiny_pipeline_dir_no_text / name).exists()
    assert set(null_components(tiny_pipeline_dir_no_text)) >= set(names)
    pipe = load_pipeline(tiny_pipeline_dir_no_text)
    assert pipe.text_encoder is None and pipe.text_encoder_3 is None
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 77 + 8, TINY_T5_WIDTH, generator=gen)
    pooled = torch.randn(1, TINY_POOLED_WIDTH, generator=gen)
    out = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=torch.zeros_like(embeds),
        negative_pooled_prompt_embeds=torch.zeros_like(pooled),
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 16, 8, 8) and torch.isfinite(out.images).all()


def test_build_is_deterministic_and_accepts_a_config(tmp_path, tiny_pipeline_dir):
    out = build_tiny_pipeline(
        tmp_path / "p", transformer_config={"num_layers": 2, "qk_norm": "rms_norm", "dual_attention_layers": [0]},
        with_text_encoders=False,
    )
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["qk_norm"] == "rms_norm" and list(cfg["dual_attention_layers"]) == [0]
    again = build_tiny_pipeline(tmp_path / "q", with_text_encoders=False)
    a = (tiny_pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (again / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b  # same seed, same weights, with or without text encoders
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_tiny_pipeline(again, with_text_encoders=False)
    with pytest.raises(ValueError, match="unknown transformer_config"):
        build_tiny_pipeline(tmp_path / "r", transformer_config={"num_blocks": 2})


def test_main_cli(tmp_path):
    from customshift_jax.testing.tiny_pipeline import main

    assert main([str(tmp_path / "cli"), "--no-text-encoders"]) == 0
    assert (tmp_path / "cli" / "model_index.json").is_file()
