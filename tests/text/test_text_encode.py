"""TextEncoders.encode equals diffusers' StableDiffusion3Pipeline.encode_prompt; the cache and the .npz format."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import rel_err  # noqa: E402

from customshift_jax.text import CachedTextEncoder, PromptEmbeds, TextEncoders  # noqa: E402

PROMPTS = ["a sks dog wearing a santa hat", "a red backpack on top of a purple rug in a forest"]
NEGATIVES = ["blurry, low quality", "a cat"]
TOL = 1e-5


@pytest.fixture(scope="session")
def encoders(tiny_pipeline_dir) -> TextEncoders:
    return TextEncoders.from_pretrained(tiny_pipeline_dir)


def _reference(pipe, prompts, negatives, **kw):
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(
            prompts, None, None, negative_prompt=negatives, device=torch.device("cpu"), **kw
        )
    return [None if x is None else x.float().numpy() for x in (pe, pp, npe, npp)]


def _check(ours: PromptEmbeds, ref) -> dict[str, float]:
    names = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
    errs = {}
    for name, expected in zip(names, ref):
        got = getattr(ours, name)
        if expected is None:
            assert got is None, name
            continue
        assert got.dtype == np.float32 and got.shape == expected.shape, (name, got.shape, expected.shape)
        errs[name] = rel_err(got, expected)
        assert errs[name] <= TOL, (name, errs[name])
    return errs


def test_encode_matches_diffusers_batch2_with_negatives(encoders, tiny_sd3_pipe):
    ours = encoders.encode(PROMPTS, NEGATIVES, max_sequence_length=24)
    ref = _reference(tiny_sd3_pipe, PROMPTS, NEGATIVES, max_sequence_length=24)
    errs = _check(ours, ref)
    print("rel errors:", errs)
    assert ours.prompt_embeds.shape == (2, 77 + 24, 96) and ours.pooled_prompt_embeds.shape == (2, 80)
    assert np.all(ours.prompt_embeds[:, :77, 80:] == 0)  # CLIP zero-padded to the T5 width
    assert np.abs(ours.prompt_embeds[:, 77:]).max() > 0
    assert np.abs(ours.prompt_embeds - ours.negative_prompt_embeds).max() > 0


def test_encode_default_negative_repeat_and_clip_skip(encoders, tiny_sd3_pipe):
    kw = dict(max_sequence_length=16, num_images_per_prompt=2, clip_skip=1)
    ours = encoders.encode(PROMPTS, **kw)
    ref = _reference(tiny_sd3_pipe, PROMPTS, None, **kw)
    _check(ours, ref)
    assert ours.prompt_embeds.shape[0] == 4
    ours_nocfg = encoders.encode(PROMPTS[:1], do_classifier_free_guidance=False, max_sequence_length=8)
    ref_nocfg = _reference(tiny_sd3_pipe, PROMPTS[:1], None, do_classifier_free_guidance=False, max_sequence_length=8)
    _check(ours_nocfg, ref_nocfg)
    assert not ours_nocfg.has_negative


def test_encode_without_t5_matches_diffusers(tiny_pipeline_dir, tiny_sd3_pipe):
    from diffusers import StableDiffusion3Pipeline

    enc = TextEncoders(
        text_encoder=tiny_sd3_pipe.text_encoder,
        tokenizer=tiny_sd3_pipe.tokenizer,
        text_encoder_2=tiny_sd3_pipe.text_encoder_2,
        tokenizer_2=tiny_sd3_pipe.tokenizer_2,
        joint_attention_dim=tiny_sd3_pipe.transformer.config.joint_attention_dim,
    )
    pipe_no_t5 = StableDiffusion3Pipeline(
        **{**tiny_sd3_pipe.components, "text_encoder_3": None, "tokenizer_3": None}
    )
    ours = enc.encode(PROMPTS, NEGATIVES, max_sequence_length=20)
    ref = _reference(pipe_no_t5, PROMPTS, NEGATIVES, max_sequence_length=20)
    _check(ours, ref)
    assert ours.prompt_embeds.shape == (2, 77 + 20, 96)
    assert np.all(ours.prompt_embeds[:, 77:] == 0)
    # the same from a folder without T5 (joint_attention_dim read from transformer/config.json)
    folder = tiny_pipeline_dir.parent / "no_t5"
    if not folder.exists():
        import json
        import shutil

        shutil.copytree(tiny_pipeline_dir, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index))
    from_folder = TextEncoders.from_pretrained(folder)
    assert from_folder.text_encoder_3 is None and from_folder.joint_attention_dim == 96
    _check(from_folder.encode(PROMPTS, NEGATIVES, max_sequence_length=20), ref)


def test_from_pretrained_errors(tmp_path, tiny_pipeline_dir_no_text):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoders.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="precomputed embeddings"):
        TextEncoders.from_pretrained(tiny_pipeline_dir_no_text)


def test_unreadable_tokenizer_is_a_clear_error(tmp_path, tiny_pipeline_dir):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, folder)
    for f in (folder / "tokenizer").iterdir():
        f.write_text("not a tokenizer")
    with pytest.raises(ValueError, match="could not read tokenizer"):
        TextEncoders.from_pretrained(folder)


def test_negative_batch_mismatch(encoders):
    with pytest.raises(ValueError, match="batch size"):
        encoders.encode(PROMPTS, ["only one"], max_sequence_length=8)


def test_cache_hits_skip_the_encoders(tmp_path, encoders):
    calls = []

    class Counting:
        identity = encoders.identity

        def encode_batch(self, prompts, **kw):
            calls.append(list(prompts))
            return encoders.encode_batch(prompts, **kw)

    cached = CachedTextEncoder(Counting(), tmp_path / "cache")
    first = cached.encode(PROMPTS, NEGATIVES, max_sequence_length=12)
    assert calls == [PROMPTS, NEGATIVES]
    direct = encoders.encode(PROMPTS, NEGATIVES, max_sequence_length=12)
    for name, arr in direct.arrays().items():
        assert rel_err(getattr(first, name), arr) <= TOL, name
    second = CachedTextEncoder(Counting(), tmp_path / "cache").encode(PROMPTS, NEGATIVES, max_sequence_length=12)
    assert len(calls) == 2  # no encoder call on the second pass
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(getattr(second, name), arr)
    # another max_sequence_length is another key; only the missing prompt is encoded, once
    cached.encode([PROMPTS[0], PROMPTS[0]], do_classifier_free_guidance=False, max_sequence_length=10)
    assert calls[-1] == [PROMPTS[0]] and len(calls) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_key_depends_on_encoder_identity(tmp_path, encoders, tiny_pipeline_dir):
    """Encoders of other weights or another dtype (another `identity`) sharing a cache folder never read each
    other's entries, each reads back its own, and clip_skip is part of the key: a key without any of these would
    hand one encoder the other's embeddings, which differ here."""
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(tiny_pipeline_dir, changed)
    (changed / "text_encoder" / "config.json").write_text(
        (changed / "text_encoder" / "config.json").read_text() + "\n")  # the same weights, another config file
    names = {"fp32": encoders.identity, "changed": TextEncoders.from_pretrained(changed).identity,
             "fp16": TextEncoders.from_pretrained(tiny_pipeline_dir, dtype="float16").identity}
    assert len(set(names.values())) == 3 and names["fp32"] == TextEncoders.from_pretrained(tiny_pipeline_dir).identity
    calls = []

    class Scaled:
        """The tiny encoders' output times `scale`, under `identity`: what a cache hit returns tells whose it is."""

        def __init__(self, name, scale):
            self.name, self.scale, self.identity = name, scale, names[name]

        def encode_batch(self, prompts, **kw):
            calls.append((self.name, kw["clip_skip"]))
            embeds, pooled = encoders.encode_batch(prompts, **kw)
            return embeds * self.scale, pooled * self.scale

    cache = tmp_path / "cache"
    got = {}
    for name, scale in (("fp32", 1.0), ("fp16", 2.0), ("changed", 3.0), ("fp32", 1.0)):
        got[name] = CachedTextEncoder(Scaled(name, scale), cache).encode_batch(PROMPTS[:1], max_sequence_length=8)
    assert calls == [("fp32", None), ("fp16", None), ("changed", None)]  # the second fp32 encoder: all hits
    for name, scale in (("fp16", 2.0), ("changed", 3.0)):
        for ours, base in zip(got[name], got["fp32"]):
            np.testing.assert_array_equal(ours, np.float32(scale) * base, err_msg=name)
    CachedTextEncoder(Scaled("fp32", 1.0), cache).encode_batch(PROMPTS[:1], max_sequence_length=8, clip_skip=1)
    assert calls[-1] == ("fp32", 1)  # another clip_skip: another key


def test_npz_roundtrip_and_missing_array(tmp_path, encoders):
    emb = encoders.encode(PROMPTS[:1], max_sequence_length=8)
    path = emb.save_npz(tmp_path / "e.npz")
    back = PromptEmbeds.load_npz(path)
    for name, arr in emb.arrays().items():
        np.testing.assert_array_equal(getattr(back, name), arr)
    np.savez(tmp_path / "bad.npz", prompt_embeds=emb.prompt_embeds)
    with pytest.raises(KeyError, match="pooled_prompt_embeds"):
        PromptEmbeds.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", prompt_embeds=emb.prompt_embeds, pooled_prompt_embeds=emb.pooled_prompt_embeds,
             negative_prompt_embeds=emb.negative_prompt_embeds)
    with pytest.raises(KeyError, match="negative_pooled_prompt_embeds"):
        PromptEmbeds.load_npz(tmp_path / "bad2.npz")
