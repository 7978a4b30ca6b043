"""Parity of the Flax SD3 VAE with diffusers' AutoencoderKL (fp32, random weights), the exact state-dict
mapping both ways, `load_vae` on diffusers folders, and the errors for bad inputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from customshift_jax.io.loading import load_vae
from customshift_jax.models.vae import (
    VAEConfig,
    init_vae,
    scale_latents,
    unscale_latents,
    vae_decode,
    vae_encode,
    vae_encode_moments,
    vae_params_from_state_dict,
    vae_state_dict_from_params,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # DESIGN section 7: a module or a forward in fp32
encode_moments_jit = jax.jit(vae_encode_moments, static_argnums=0)
encode_jit = jax.jit(vae_encode, static_argnums=0)
decode_jit = jax.jit(vae_decode, static_argnums=0)
IMAGE_SHAPE = (2, 3, 32, 48)  # batch 2, non-square; the tiny VAE downsamples 4x
LATENT_SHAPE = (2, 16, 8, 12)  # tests share these shapes so the jitted functions compile once


def _torch_vae(config: VAEConfig, seed: int = 0):
    """diffusers AutoencoderKL with torch's random init, plus random GroupNorm affines (so scale/bias mix-ups show)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tiny():
    config = VAEConfig.tiny()
    model = _torch_vae(config)
    return config, model, vae_params_from_state_dict(config, model.state_dict())


def _parity(config, model, params, images):
    """Relative errors of our fp32 (mean, logvar, decode(mean)) against `model` (diffusers, fp32 or fp64).

    Both sides decode the same fp32 latents (the reference's mean rounded to fp32)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        post = model.encode(images.to(dtype)).latent_dist
        z = post.mean.float()
        decoded = model.decode(z.to(dtype)).sample
    mean, logvar = encode_moments_jit(config, params, images.numpy())
    out = decode_jit(config, params, z.numpy())
    assert mean.shape == tuple(post.mean.shape) and out.shape == tuple(decoded.shape)
    return rel_err(mean, post.mean.numpy()), rel_err(logvar, post.logvar.numpy()), rel_err(out, decoded.numpy())


def test_tiny_parity_batch_nonsquare(tiny):
    config, model, params = tiny
    images = torch.rand(*IMAGE_SHAPE) * 2 - 1
    e_mean, e_logvar, e_dec = _parity(config, model, params, images)
    assert e_mean <= TOL and e_logvar <= TOL and e_dec <= TOL, (e_mean, e_logvar, e_dec)


def test_sd3_width_parity():
    # Reference: the same diffusers VAE run in fp64 (weights are the fp32 ones, exactly). At SD3 depth
    # diffusers' own fp32 forward is 0.7e-5 to 1.1e-5 from that exact result on random weights (oneDNN's conv
    # round-off, accumulated over ~30 convs), so fp32-vs-fp32 sits at the round-off floor and cannot hold 1e-5
    # for every input; ours is held to 1e-5 of the exact forward instead (measured 4.5e-6 to 8.4e-6 over
    # 4 seeds). The tiny-width test above compares fp32 with fp32.
    config = VAEConfig.sd3()
    model = _torch_vae(config)
    params = vae_params_from_state_dict(config, model.state_dict())
    e_mean, e_logvar, e_dec = _parity(config, model.double(), params, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert e_mean <= TOL and e_logvar <= TOL and e_dec <= TOL, (e_mean, e_logvar, e_dec)


def test_sample_is_mean_plus_std_noise(tiny):
    config, _, params = tiny
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, IMAGE_SHAPE), jnp.float32)
    key = jax.random.key(3)
    mean, logvar = encode_moments_jit(config, params, images)
    sample = encode_jit(config, params, images, sample_key=key)
    noise = jax.random.normal(key, (mean.size,), mean.dtype).reshape(mean.shape)  # == the 4-D draw
    expected = mean + jnp.exp(0.5 * logvar) * noise
    assert rel_err(sample, expected) <= TOL
    assert np.array_equal(encode_jit(config, params, images), mean)


def test_jit_decode_params_are_arguments(tiny):
    # Config static, params traced: new weights of the same structure reuse the compiled decode.
    config, _, params = tiny
    z = jnp.asarray(np.random.default_rng(1).standard_normal(LATENT_SHAPE), jnp.float32)
    out = decode_jit(config, params, z)
    size = decode_jit._cache_size()
    out2 = decode_jit(config, jax.tree_util.tree_map(lambda a: 2 * a, params), z)
    assert decode_jit._cache_size() == size
    assert out.shape == out2.shape == (2, 3, 32, 48) and not np.allclose(out, out2)


def test_scale_unscale_inverse():
    config = VAEConfig.sd3()
    z = jnp.linspace(-3.0, 3.0, 16)
    np.testing.assert_allclose(scale_latents(config, z), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(config, scale_latents(config, z)), z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_state_dict_round_trip_bit_exact(tiny, dtype):
    config, model, _ = tiny
    sd = {k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    back = vae_state_dict_from_params(config, vae_params_from_state_dict(config, sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        ref = v.view(torch.int16).numpy() if dtype == "bfloat16" else v.numpy()
        got = back[k].view(np.int16) if dtype == "bfloat16" else back[k]
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), k


def test_init_matches_mapping_structure(tiny):
    config, model, params = tiny
    fresh = init_vae(config, jax.random.key(0))
    shapes = jax.tree_util.tree_map(jnp.shape, fresh)
    assert shapes == jax.tree_util.tree_map(jnp.shape, params)
    assert set(vae_state_dict_from_params(config, fresh)) == set(model.state_dict())


def test_save_pretrained_then_load_vae(tiny, tmp_path):
    config, model, params = tiny
    model.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        loaded_config, loaded = load_vae(path)
        assert loaded_config == config
        assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(loaded),
                                                         jax.tree_util.tree_leaves(params)))


def test_load_vae_errors(tiny, tmp_path):
    config, model, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vae(bad)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(noweights)


def test_mapping_names_missing_key(tiny):
    config, model, _ = tiny
    sd = dict(model.state_dict())
    del sd["decoder.up_blocks.0.resnets.1.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n  decoder\.up_blocks\.0\.resnets\.1\.conv1\.weight"):
        vae_params_from_state_dict(config, sd)


def test_mapping_names_unexpected_key(tiny):
    config, model, _ = tiny
    sd = {**model.state_dict(), "encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\n  encoder\.mid_block\.attentions\.0\.query\.weight"):
        vae_params_from_state_dict(config, sd)


def test_mapping_names_wrong_shape(tiny):
    config, model, _ = tiny
    sd = {**model.state_dict(), "encoder.conv_in.weight": torch.zeros(32, 3, 1, 1)}
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight: got \(32, 3, 1, 1\), expected \(32, 3, 3, 3\)"):
        vae_params_from_state_dict(config, sd)


def test_mapping_error_lists_first_20_then_count(tiny):
    config, model, _ = tiny
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    with pytest.raises(ValueError, match=r"missing keys \(\d+\):(\n  decoder\.\S+){20}\n  \.\.\. and \d+ more"):
        vae_params_from_state_dict(config, sd)


def test_config_round_trip_and_refusals():
    for config in (VAEConfig.tiny(), VAEConfig.sd3()):
        d = config.to_diffusers_config()
        assert VAEConfig.from_diffusers_config({"_class_name": "AutoencoderKL", **d}) == config
        assert tuple(diffusers.AutoencoderKL.from_config(d).config.block_out_channels) == config.block_out_channels
    hash(VAEConfig.sd3())
    d = VAEConfig.sd3().to_diffusers_config()
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_diffusers_config({**d, "use_quant_conv": True})
    missing = dict(d)
    del missing["shift_factor"]
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers_config(missing)
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_diffusers_config({**d, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
