"""The JAX text encoders (customshift_jax.text.jax) against transformers and diffusers' encode_prompt, fp32 and bf16,
their loader's refusals, and the sharded encode on the 8-device CPU mesh."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax
import jax.numpy as jnp
from conftest import rel_err

from customshift_jax.io.safetensors import SafetensorsFile, write_safetensors
from customshift_jax.parallel.sharding import make_mesh
from customshift_jax.text import TextEncoders
from customshift_jax.io.transformers_folder import load_encoder_params
from customshift_jax.models.text_encoders.api import build_encoder
from customshift_jax.models.text_encoders.t5 import relative_position_buckets
from customshift_jax.text.jax import JaxTextEncoders

TOL = 1e-5
PROMPTS = ["a sks dog wearing a santa hat", "a red backpack on top of a purple rug in a forest", "a cat"]
LONG = " ".join(["a shiny red dog on the beach with a mountain in the background"] * 12)  # > 77 CLIP tokens


@pytest.fixture(scope="module")
def jax_encoders(tiny_pipeline_dir) -> JaxTextEncoders:
    return JaxTextEncoders.from_pretrained(tiny_pipeline_dir)


def _torch_outputs(model, ids: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(ids), output_hidden_states=True)


def _check_clip(folder, ids):
    from transformers import CLIPTextModelWithProjection

    config, params = load_encoder_params(folder)
    ours = build_encoder(config).apply({"params": params}, jnp.asarray(ids))
    ref = _torch_outputs(CLIPTextModelWithProjection.from_pretrained(folder).eval(), ids)
    assert len(ref.hidden_states) == ours["hidden_states"].shape[0] == config.num_hidden_layers + 1
    for i, h in enumerate(ref.hidden_states):
        assert rel_err(ours["hidden_states"][i], h.numpy()) <= TOL, i
    assert rel_err(ours["last_hidden_state"], ref.last_hidden_state.numpy()) <= TOL
    assert rel_err(ours["text_embeds"], ref.text_embeds.numpy()) <= TOL
    return config


def _check_t5(folder, ids):
    from transformers import T5EncoderModel

    config, params = load_encoder_params(folder)
    ours = build_encoder(config).apply({"params": params}, jnp.asarray(ids))
    ref = _torch_outputs(T5EncoderModel.from_pretrained(folder).eval(), ids)
    assert rel_err(ours, ref.last_hidden_state.numpy()) <= TOL


def test_each_encoder_matches_transformers(tiny_pipeline_dir):
    """Every hidden state, the pooled projection (first-EOS rule: EOS ids placed early) and T5's output."""
    rng = np.random.default_rng(0)
    for name in ("text_encoder", "text_encoder_2"):
        config = load_encoder_params(tiny_pipeline_dir / name)[0]
        ids = rng.integers(0, config.vocab_size, (3, 77))
        ids[:, [5, 9, 30]] = config.eos_token_id  # pooled reads the first one
        _check_clip(tiny_pipeline_dir / name, ids)
    _check_t5(tiny_pipeline_dir / "text_encoder_3", rng.integers(0, 200, (2, 40)))


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(300, 32, 128), ref.numpy())


def test_real_width_clips_one_layer_each(tmp_path):
    """CLIP-L (768, quick_gelu, the legacy eos_token_id=2 argmax rule) and bigG (1280, gelu, the first-EOS rule) at
    real width with one layer each and a small vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    rng = np.random.default_rng(1)
    for name, width, heads, act, eos in (("l", 768, 12, "quick_gelu", 2), ("g", 1280, 20, "gelu", 999)):
        cfg = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
                             num_hidden_layers=1, num_attention_heads=heads, hidden_act=act, eos_token_id=eos)
        CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path / name)
        ids = rng.integers(3, 900, (2, 77))
        ids[0, 20], ids[1, 50] = 999, 999  # the highest id (legacy rule) and the EOS id (new rule) coincide here
        ids[:, 60] = 2 if eos == 999 else 998  # ... and an id-2 token (or a high non-EOS one) tells the rules apart
        assert _check_clip(tmp_path / name, ids).eos_token_id == eos


@pytest.mark.slow  # ~20 s and 2.5 GB; test_each_encoder_matches_transformers covers the same structure at toy width
def test_real_width_t5_xxl_one_layer(tmp_path):
    """T5-XXL's widths (4096, 64 heads of 64, d_ff 10240, 32 buckets up to 128) with one layer, vocabulary 1000."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5Config(vocab_size=1000, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(t5).save_pretrained(tmp_path / "t5")
    _check_t5(tmp_path / "t5", np.random.default_rng(2).integers(0, 1000, (1, 160)))


def test_generate_text_backend_jax_equals_torch(tiny_pipeline_dir, tmp_path, capsys):
    """`customshift generate --text-backend jax` gives the latents of `--text-backend torch` (tiny pipeline)."""
    from customshift_jax.cli.main import main

    common = ["generate", "--checkpoint", str(tiny_pipeline_dir), "--prompt", "a dog on the beach", "--height", "16",
              "--width", "16", "--steps", "2", "--max-sequence-length", "16", "--text-cache", str(tmp_path / "cache")]
    for backend in ("torch", "jax"):
        code = main([*common, "--text-backend", backend, "--out", str(tmp_path / backend),
                     "--save-latents", str(tmp_path / f"{backend}.npy")])
        assert code == 0, capsys.readouterr().err
    assert rel_err(np.load(tmp_path / "jax.npy"), np.load(tmp_path / "torch.npy")) <= TOL


def _reference(pipe, prompts, negatives, **kw):
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, negative_prompt=negatives,
                                              device=torch.device("cpu"), **kw)
    return [None if x is None else x.float().numpy() for x in (pe, pp, npe, npp)]


@pytest.mark.parametrize("kw", [
    {"do_classifier_free_guidance": True, "num_images_per_prompt": 2, "max_sequence_length": 40},
    {"do_classifier_free_guidance": False, "num_images_per_prompt": 1, "max_sequence_length": 8, "clip_skip": 1},
])
def test_encode_prompt_matches_diffusers(jax_encoders, tiny_sd3_pipe, kw):
    prompts = PROMPTS + [LONG]  # truncated in both CLIPs and T5
    negatives = ["blurry", "", "low quality", "a cat"] if kw["do_classifier_free_guidance"] else None
    ref = _reference(tiny_sd3_pipe, prompts, negatives, **kw)
    ours = jax_encoders.encode(prompts, negatives, **kw)
    names = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, expected in zip(names, ref):
        got = getattr(ours, name)
        assert (got is None) == (expected is None), name
        if expected is not None:
            assert got.shape == expected.shape and rel_err(got, expected) <= TOL, name


def test_batches_padded_to_buckets(tiny_pipeline_dir):
    """5 prompts over buckets (2, 4) run as a 4 and a 1 padded to 2; 3 prompts then reuse bucket 4's compile."""
    small = JaxTextEncoders.from_pretrained(tiny_pipeline_dir, batch_buckets=(2, 4))
    exact = TextEncoders.from_pretrained(tiny_pipeline_dir)
    for prompts in (PROMPTS + ["a dog", "a vase"], PROMPTS):
        for got, want in zip(small.encode_batch(prompts, max_sequence_length=12),
                             exact.encode_batch(prompts, max_sequence_length=12)):
            assert got.shape == want.shape and rel_err(got, want) <= TOL
    assert small.compiled_shapes == 2


def test_bf16_error_beside_torch_bf16(tiny_pipeline_dir):
    """bf16 (norms and softmax in fp32): our error against fp32 PyTorch is at most PyTorch bf16's own."""
    exact = TextEncoders.from_pretrained(tiny_pipeline_dir).encode_batch(PROMPTS, max_sequence_length=32)
    torch_bf16 = TextEncoders.from_pretrained(tiny_pipeline_dir, dtype="bfloat16").encode_batch(
        PROMPTS, max_sequence_length=32)
    ours = JaxTextEncoders.from_pretrained(tiny_pipeline_dir, dtype="bfloat16").encode_batch(
        PROMPTS, max_sequence_length=32)
    for got, theirs, want in zip(ours, torch_bf16, exact):
        err, torch_err = rel_err(got, want), rel_err(theirs, want)
        assert 1e-4 < err <= torch_err, (err, torch_err)  # bf16 for real, and no worse than PyTorch's


def _copy_t5(src, dst):
    shutil.copytree(src / "text_encoder_3", dst)
    st = SafetensorsFile(dst / "model.safetensors")
    return {k: np.array(st.get(k)) for k in st.keys()}  # noqa: SIM118 (no __iter__)


def test_loader_refuses_by_name(tiny_pipeline_dir, tmp_path):
    tensors = _copy_t5(tiny_pipeline_dir, tmp_path / "missing")
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    write_safetensors(tmp_path / "missing" / "model.safetensors", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match=r"1 tensors missing .*'encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
        load_encoder_params(tmp_path / "missing")

    tensors = _copy_t5(tiny_pipeline_dir, tmp_path / "shape")
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    write_safetensors(tmp_path / "shape" / "model.safetensors", {**tensors, key: tensors[key][:, :-1]})
    with pytest.raises(ValueError, match=r"wrong shape.*encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight has "
                                         r"shape \(32, 95\), expected \(32, 96\)"):
        load_encoder_params(tmp_path / "shape")

    tensors = _copy_t5(tiny_pipeline_dir, tmp_path / "extra")
    write_safetensors(tmp_path / "extra" / "model.safetensors", {**tensors, "encoder.block.2.layer.0.x": tensors[key]})
    with pytest.raises(ValueError, match=r"unexpected tensors 'encoder\.block\.2\.layer\.0\.x'"):
        load_encoder_params(tmp_path / "extra")


def test_sharded_index_loads_and_a_truncated_shard_is_refused(tiny_pipeline_dir, tmp_path):
    import json

    folder = tmp_path / "sharded"
    tensors = _copy_t5(tiny_pipeline_dir, folder)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        write_safetensors(folder / file, {k: tensors[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params = load_encoder_params(folder)
    _, whole = load_encoder_params(tiny_pipeline_dir / "text_encoder_3")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, whole)

    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors.*truncated"):
        load_encoder_params(folder)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*missing"):
        load_encoder_params(folder)


@pytest.mark.parametrize("rules,sizes", [("fsdp", {"fsdp": 8}), ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_encode_equals_unsharded(tiny_pipeline_dir, jax_encoders, rules, sizes):
    mesh = make_mesh(**sizes)
    sharded = JaxTextEncoders.from_pretrained(tiny_pipeline_dir, mesh=mesh, rules=rules)
    kernel = sharded.params["text_encoder_3"]["encoder"]["block"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # really split over the mesh
    prompts = PROMPTS + [LONG]  # the shapes test_encode_prompt_matches_diffusers compiled unsharded
    want = jax_encoders.encode_batch(prompts, max_sequence_length=40)
    got = sharded.encode_batch(prompts, max_sequence_length=40)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) <= TOL


def test_encode_text_backend_jax_equals_torch(tiny_pipeline_dir, tmp_path):
    """`customshift encode --text-backend jax` writes the arrays of `--text-backend torch`."""
    from customshift_jax.cli.main import main

    for backend in ("torch", "jax"):
        assert main(["encode", "--text-encoders", str(tiny_pipeline_dir), "--prompt", "a dog on the beach",
                     "--subject", "dog", "--max-sequence-length", "16", "--text-backend", backend,
                     "--out", str(tmp_path / f"{backend}.npz")]) == 0
    with np.load(tmp_path / "torch.npz") as want, np.load(tmp_path / "jax.npz") as got:
        assert sorted(got.files) == sorted(want.files) and "subject_embeds" in got.files
        for name in want.files:
            assert rel_err(got[name], want[name]) <= TOL, name


def test_prepare_text_backend_jax_writes_the_same_shards(tiny_pipeline_dir, tmp_path):
    """`prepare --text-backend jax` writes the shards `--text-backend torch` writes: latents bit for bit (the same
    VAE path), the caption and subject embeddings within 1e-5."""
    import json

    from conftest import DOG

    from customshift_jax.cli.main import main
    from customshift_jax.train.data import ShardDataset

    dog = sorted(DOG.parent.glob("*.jpg"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"reference": str(dog[i]), "target": str(dog[i + 1]), "subject": "dog",
                                            "caption": PROMPTS[i]}) + "\n" for i in range(2)))
    for backend in ("torch", "jax"):
        assert main(["prepare", str(manifest), str(tmp_path / backend), "--checkpoint", str(tiny_pipeline_dir),
                     "--text-encoders", str(tiny_pipeline_dir), "--size", "16", "--max-sequence-length", "16",
                     "--text-backend", backend]) == 0
    ours, ref = ShardDataset(tmp_path / "jax"), ShardDataset(tmp_path / "torch")
    assert len(ours) == len(ref) == 2
    for i in range(2):
        got, want = ours.get(i), ref.get(i)
        assert set(got) == set(want)
        for k in want:
            if k.endswith("latents") or k.endswith("latents_flip"):
                np.testing.assert_array_equal(got[k], want[k])
            else:
                assert rel_err(got[k], want[k]) <= TOL, k
