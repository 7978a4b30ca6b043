"""Build a tiny, randomly initialised SD3 pipeline folder that diffusers loads offline.

Used by tests and the demo: every component (MMDiT, VAE, scheduler, CLIP-L, CLIP-G, T5, their
tokenizers) has the real SD3 structure at toy width, so code paths match the real checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Text-encoder widths (SD3: CLIP-L 768, CLIP-G 1280, T5-XXL 4096). CLIP-L + CLIP-G hidden (80) is
# narrower than the T5 width (96) so that diffusers' zero padding of the CLIP features is exercised.
TINY_CLIP_L_WIDTH = 32
TINY_CLIP_G_WIDTH = 48
TINY_CLIP_L_PROJECTION = 32
TINY_CLIP_G_PROJECTION = 48
TINY_T5_WIDTH = 96
TINY_POOLED_WIDTH = TINY_CLIP_L_PROJECTION + TINY_CLIP_G_PROJECTION
TINY_TEXT_WIDTHS: dict[str, int] = {
    "clip_l": TINY_CLIP_L_WIDTH,
    "clip_g": TINY_CLIP_G_WIDTH,
    "t5": TINY_T5_WIDTH,
    "joint_attention_dim": TINY_T5_WIDTH,
    "pooled_projection_dim": TINY_POOLED_WIDTH,
}
CLIP_MAX_LENGTH = 77  # the real CLIP tokenizers' model_max_length
T5_MAX_LENGTH = 512

DEFAULT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5_WIDTH,
    "caption_projection_dim": 16,
    "pooled_projection_dim": TINY_POOLED_WIDTH,
    "out_channels": 16,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [],
    "qk_norm": None,
}

# SD3's VAE at toy width: 16 latent channels, no quant convs, SD3's scaling and shift.
DEFAULT_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

_DREAMBENCH_SUBJECTS = [
    "backpack", "stuffed animal", "bowl", "can", "candle", "cat", "clock", "sneaker", "dog",
    "toy", "boot", "glasses", "cartoon", "teapot", "vase", "sloth plushie", "duck toy",
]
_DREAMBENCH_TEMPLATES = [
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background", "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water", "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it", "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road",
    "a {} on top of a white rug", "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
    "a {} wearing a red hat", "a {} wearing a santa hat", "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle", "a {} in a chef outfit", "a {} in a firefighter outfit",
    "a {} in a police outfit", "a {} wearing pink glasses", "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
]


def training_sentences() -> list[str]:
    """DreamBench-style prompts (templates x subjects, with and without the `sks` token) to train the toy tokenizers."""
    out = []
    for i, template in enumerate(_DREAMBENCH_TEMPLATES):
        for j, subject in enumerate(_DREAMBENCH_SUBJECTS):
            if (i + j) % 3 == 0:
                out.append(template.format(subject))
            elif (i + j) % 3 == 1:
                out.append(template.format("sks " + subject))
    out += ["A photo of a dog.", "An oil painting of a cat, highly detailed!", "low quality, blurry"]
    return out


def _clip_vocab_and_merges(sentences: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a CLIP-style byte-level BPE (end-of-word suffix `</w>`); return (vocab, merges).

    The vocabulary is laid out like OpenAI CLIP's: 256 byte symbols, the same with `</w>`, the merge
    results in merge order, then `<|startoftext|>` and `<|endoftext|>` last.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer + pre-tokenizer, empty BPE
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sentences, trainer=trainer)
    merges = [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str,
                          max_length: int = CLIP_MAX_LENGTH):
    """Write vocab.json/merges.txt, then load them with CLIPTokenizer and save_pretrained next to them."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token=pad_token)
    tok.save_pretrained(folder)
    return tok


def _write_t5_tokenizer(folder: Path, sentences: list[str], vocab_size: int, seed: int, model_type: str = "unigram"):
    """Train a unigram sentencepiece model with T5's ids (pad 0, eos 1, unk 2, no bos).

    Saves spiece.model and, through T5Tokenizer.save_pretrained, tokenizer.json.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tok = T5Tokenizer.from_pretrained(folder, model_max_length=T5_MAX_LENGTH)
    tok.save_pretrained(folder)
    return tok


def _clip_config(vocab: dict[str, int], tok, width: int, projection: int, hidden_act: str,
                 max_length: int = CLIP_MAX_LENGTH):
    """A tiny CLIPTextConfig whose special-token ids match the tokenizer (pooling reads the first eos)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_tiny_pipeline(
    path: str | Path,
    *,
    transformer_config: dict | None = None,
    with_text_encoders: bool = True,
    seed: int = 0,
    vae_config: dict | None = None,
    sentences: list[str] | None = None,
    clip_max_length: int = CLIP_MAX_LENGTH,
    t5_tokenizer: tuple[str, int] = ("unigram", 200),
) -> Path:
    """Write a tiny random SD3 pipeline folder at `path` (created; must be empty or absent) and return it.

    `transformer_config` overrides DEFAULT_TRANSFORMER_CONFIG key by key. With
    `with_text_encoders=False` the text encoders and tokenizers are null in model_index.json and the
    pipeline runs from precomputed embeddings only. Weights are deterministic in `seed`. `vae_config` replaces
    DEFAULT_VAE_CONFIG; `sentences` (default: DreamBench-style prompts) train the tokenizers, and
    `clip_max_length` is the CLIP tokenizers' and position embeddings' length (SD3: 77); `t5_tokenizer` is the
    sentencepiece (model type, vocabulary size) of the T5 tokenizer.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"build_tiny_pipeline: {path} exists and is not an empty folder; pass a new path")
    config = dict(DEFAULT_TRANSFORMER_CONFIG)
    if transformer_config:
        unknown = set(transformer_config) - set(DEFAULT_TRANSFORMER_CONFIG)
        if unknown:
            raise ValueError(
                f"unknown transformer_config keys {sorted(unknown)}; "
                f"expected a subset of {sorted(DEFAULT_TRANSFORMER_CONFIG)}"
            )
        config.update(transformer_config)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**(vae_config or DEFAULT_VAE_CONFIG))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        text = dict.fromkeys(
            ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            if with_text_encoders:
                text = _build_text_components(Path(tmp), config, seed, sentences, clip_max_length, t5_tokenizer)
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **text)
            path.mkdir(parents=True, exist_ok=True)
            with _quiet_hf():  # no "None cannot be saved" warnings or shard progress bars
                pipe.save_pretrained(path, safe_serialization=True)
            if with_text_encoders:  # keep the raw tokenizer files too (vocab.json/merges.txt, spiece.model)
                for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
                    for f in (Path(tmp) / name).iterdir():
                        if not (path / name / f.name).exists():
                            shutil.copy2(f, path / name / f.name)
    return path


@contextlib.contextmanager
def _quiet_hf():
    """Silence diffusers/transformers warnings and progress bars for the duration of a save."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    old = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
        if old[2]:
            dlog.enable_progress_bar()
        if old[3]:
            tlog.enable_progress_bar()


def null_components(path: str | Path) -> dict[str, None]:
    """The components that `path`/model_index.json lists as null, mapped to None.

    diffusers' `from_pretrained` refuses a folder whose required components are null unless they are
    passed explicitly: `StableDiffusion3Pipeline.from_pretrained(path, **null_components(path))`.
    """
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file} not found: expected a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    return {
        k: None
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None
    }


def load_pipeline(path: str | Path, **kwargs: Any):
    """`StableDiffusion3Pipeline.from_pretrained(path)`, passing None for the components listed as null."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, **{**null_components(path), **kwargs})


def _build_text_components(tmp: Path, transformer_config: dict, seed: int, sentences: list[str] | None = None,
                           clip_max_length: int = CLIP_MAX_LENGTH,
                           t5_tokenizer: tuple[str, int] = ("unigram", 200)) -> dict:
    """Tokenizers (trained on DreamBench-style text) and the three tiny random text encoders."""
    import torch
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if transformer_config["joint_attention_dim"] != TINY_T5_WIDTH:
        raise ValueError(
            f"transformer_config['joint_attention_dim'] must equal the tiny T5 width {TINY_T5_WIDTH} "
            f"when text encoders are built, got {transformer_config['joint_attention_dim']}"
        )
    if transformer_config["pooled_projection_dim"] != TINY_POOLED_WIDTH:
        raise ValueError(
            f"transformer_config['pooled_projection_dim'] must equal CLIP-L + CLIP-G projection "
            f"{TINY_POOLED_WIDTH} when text encoders are built, got {transformer_config['pooled_projection_dim']}"
        )
    sentences = training_sentences() if sentences is None else sentences
    vocab, merges = _clip_vocab_and_merges(sentences, vocab_size=600)
    tok_l = _write_clip_tokenizer(tmp / "tokenizer", vocab, merges, pad_token="<|endoftext|>",
                                  max_length=clip_max_length)
    tok_g = _write_clip_tokenizer(tmp / "tokenizer_2", vocab, merges, pad_token="!",  # as SD3's CLIP-G
                                  max_length=clip_max_length)
    tok_t5 = _write_t5_tokenizer(tmp / "tokenizer_3", sentences, vocab_size=t5_tokenizer[1], seed=seed,
                                 model_type=t5_tokenizer[0])

    torch.manual_seed(seed + 2)
    enc_l = CLIPTextModelWithProjection(
        _clip_config(vocab, tok_l, TINY_CLIP_L_WIDTH, TINY_CLIP_L_PROJECTION, "quick_gelu", clip_max_length)
    )
    torch.manual_seed(seed + 3)
    enc_g = CLIPTextModelWithProjection(
        _clip_config(vocab, tok_g, TINY_CLIP_G_WIDTH, TINY_CLIP_G_PROJECTION, "gelu", clip_max_length))
    torch.manual_seed(seed + 4)
    enc_t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok_t5),
            d_model=TINY_T5_WIDTH,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tok_t5.pad_token_id,
            eos_token_id=tok_t5.eos_token_id,
        )
    )
    for enc in (enc_l, enc_g, enc_t5):
        enc.eval()
    return {
        "text_encoder": enc_l,
        "text_encoder_2": enc_g,
        "text_encoder_3": enc_t5,
        "tokenizer": tok_l,
        "tokenizer_2": tok_g,
        "tokenizer_3": tok_t5,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m customshift_jax.testing.tiny_pipeline OUT_DIR [--no-text-encoders] [--seed N]`."""
    parser = argparse.ArgumentParser(description="Build a tiny random SD3 pipeline folder (diffusers format).")
    parser.add_argument("out_dir", type=Path, help="folder to create (must be absent or empty)")
    parser.add_argument("--no-text-encoders", action="store_true", help="omit text encoders and tokenizers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_pipeline(args.out_dir, with_text_encoders=not args.no_text_encoders, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
