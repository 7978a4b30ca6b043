"""`customshift convert` / `export`: diffusers folders and original single files -> orbax -> diffusers, exact.

Oracles: diffusers' own forward (relative error <= 1e-5), diffusers' single-file loader
(`from_single_file`) for the original key names, and torch's `.to(torch.bfloat16)` for bf16 casts.
"""
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from customshift_jax import get_preset, load_transformer
from customshift_jax.cli.main import main
from customshift_jax.crosscheck.mmdit import crosscheck_model, random_diffusers_transformer
from customshift_jax.io.checkpoint import load_checkpoint
from customshift_jax.io.convert import Progress, cast_array, convert, release_pages
from customshift_jax.io.safetensors import SafetensorsFile, write_safetensors
from customshift_jax.io.single_file import (
    TRANSFORMER_PREFIX,
    VAE_PREFIX,
    infer_transformer_config,
    infer_vae_config,
    transformer_layout,
    transformer_to_original,
    vae_layout,
    vae_to_original,
)
from customshift_jax.models.mmdit.mapping import params_from_state_dict, state_dict_from_params

TOL = 1e-5
TINY = ["tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large"]
TEXT_KEY = "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"


def _assert_trees_equal(a, b):
    """Same structure, dtypes and bits."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{jax.tree_util.keystr(path)} differs"


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a torch tensor as unsigned ints."""
    width = {torch.float32: (torch.int32, np.uint32), torch.bfloat16: (torch.int16, np.uint16),
             torch.float16: (torch.int16, np.uint16)}[t.dtype]
    return t.contiguous().view(width[0]).numpy().view(width[1])


@pytest.fixture(scope="module", params=TINY)
def tiny(request, tmp_path_factory):
    """(name, config, diffusers model, pipeline-style folder with transformer/) per tiny preset."""
    config = get_preset(request.param)
    model = random_diffusers_transformer(config, seed=11)
    folder = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    model.save_pretrained(folder / "pipe" / "transformer")
    return request.param, config, model, folder


def test_diffusers_folder_converts_loads_and_matches_forward(tiny, capsys):
    name, config, model, folder = tiny
    dst = folder / "ckpt"
    assert main(["convert", str(folder / "pipe" / "transformer"), str(dst), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded_config, params = load_transformer(dst)
    assert loaded_config == config
    _assert_trees_equal(params, params_from_state_dict(config, model.state_dict()))
    r = crosscheck_model(name, config, model, batch=2, height=12, width=8, seed=5, params=params)
    assert r.rel <= TOL, f"{name}: relative error {r.rel:.2e}"


def test_single_file_matches_diffusers_single_file_loader(tiny, capsys):
    from diffusers import SD3Transformer2DModel

    name, config, model, folder = tiny
    original = transformer_to_original(config, model.state_dict())
    tensors = {TRANSFORMER_PREFIX + k: v for k, v in original.items()}
    tensors[TEXT_KEY] = np.zeros((77, 32), np.float32)  # a text encoder in the file: skipped with a note
    path = folder / "sd3_original.safetensors"
    write_safetensors(path, tensors)
    # The original names carry the fused qkv, x_block/context_block and the swapped AdaLN halves.
    assert f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.weight" in tensors
    assert f"{TRANSFORMER_PREFIX}final_layer.adaLN_modulation.1.weight" in tensors

    oracle = SD3Transformer2DModel.from_single_file(str(path), config=str(folder / "pipe"), subfolder="transformer",
                                                    torch_dtype=torch.float32).eval()
    # Our writer is the exact inverse of diffusers' converter: the oracle holds the original weights.
    expected_sd = model.state_dict()
    assert sorted(oracle.state_dict()) == sorted(expected_sd)
    assert all(torch.equal(v, expected_sd[k]) for k, v in oracle.state_dict().items())

    # Ours, through the library (config given: tiny heads are 8 wide, not SD3's 64) and through the CLI.
    loaded_config, params = load_transformer(path, config=config)
    assert loaded_config == config
    _assert_trees_equal(params, params_from_state_dict(config, oracle.state_dict()))
    r = crosscheck_model(name, config, oracle, batch=2, height=12, width=8, seed=6, params=params)
    assert r.rel <= TOL, f"{name}: relative error {r.rel:.2e}"

    dst = folder / "ckpt_single"
    assert main(["convert", str(path), str(dst), "--config", str(folder / "pipe"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 text-encoder tensors (text_encoders.clip_l)" in err
    (cli_config, cli_params), = load_checkpoint(dst).values()
    assert cli_config == config
    _assert_trees_equal(cli_params, params)


@pytest.mark.parametrize("name", ["tiny-sd3.5-medium", "tiny-sd3.5-large"])
def test_single_file_config_inferred_from_qk_norm_shapes(name, tmp_path):
    config = get_preset(name)
    model = random_diffusers_transformer(config, seed=2)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {TRANSFORMER_PREFIX + k: v
                             for k, v in transformer_to_original(config, model.state_dict()).items()})
    inferred, params = load_transformer(path)
    assert dataclasses.replace(inferred, sample_size=config.sample_size) == config
    _assert_trees_equal(params, params_from_state_dict(config, model.state_dict()))


@pytest.mark.parametrize("name", ["sd3-medium", pytest.param("sd3.5-medium", marks=pytest.mark.slow),
                                  pytest.param("sd3.5-large", marks=pytest.mark.slow)])
def test_config_inference_on_released_shapes(name):
    # The real shapes (abstract: nothing allocated) give back the released config. The SD3.5 ones are slow
    # only because tracing their shapes computes the big sin-cos position tables; the tiny SD3.5 presets
    # cover the same qk-norm / dual-attention inference in the default run.
    config = get_preset(name)
    shapes = {k: t.shape for k, t in transformer_layout(config).items()}
    assert shapes["pos_embed"] == (1, config.pos_embed_max_size ** 2, config.inner_dim)
    assert infer_transformer_config(shapes) == config


def test_vae_config_inference_on_sd3_shapes():
    from customshift_jax.models.vae import VAEConfig

    config = VAEConfig.sd3()
    shapes = {k: t.shape for k, t in vae_layout(config).items()}
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)  # LDM counts up-levels bottom-up
    assert infer_vae_config(shapes) == config


def test_vae_expected_shapes_follow_the_vae_mapping():
    # Our key/shape rule for the VAE must agree with customshift_jax.models.vae.mapping.
    from customshift_jax.io.single_file import vae_state_dict_shapes
    from customshift_jax.models.vae import VAEConfig, init_vae, vae_state_dict_from_params

    config = VAEConfig.tiny()
    sd = vae_state_dict_from_params(config, init_vae(config, jax.random.key(0)))
    assert vae_state_dict_shapes(config) == {k: v.shape for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", with_text_encoders=False, seed=3)


def test_pipeline_round_trip_is_bit_exact(tiny_pipeline, tmp_path, capsys):
    # diffusers -> orbax -> diffusers at fp32: every tensor identical, and diffusers loads the export.
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from customshift_jax.io.loading import load_vae

    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert main(["convert", str(tiny_pipeline), str(ckpt), "--no-progress"]) == 0
    loaded = load_checkpoint(ckpt)
    assert sorted(loaded) == ["transformer", "vae"]
    vae_config, vae_params = load_vae(tiny_pipeline)
    assert loaded["vae"][0] == vae_config
    _assert_trees_equal(loaded["vae"][1], jax.tree_util.tree_map(np.asarray, vae_params))

    assert main(["export", str(ckpt), str(out)]) == 0
    for sub in ("transformer", "vae"):
        a = SafetensorsFile(tiny_pipeline / sub / "diffusion_pytorch_model.safetensors")
        b = SafetensorsFile(out / sub / "diffusion_pytorch_model.safetensors")
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get(key), b.get(key)
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, key
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), key
        original = json.loads((tiny_pipeline / sub / "config.json").read_text())
        exported = json.loads((out / sub / "config.json").read_text())
        for field in ("_class_name", "num_layers", "block_out_channels", "scaling_factor", "shift_factor"):
            assert exported.get(field) == original.get(field), field
    t0 = SD3Transformer2DModel.from_pretrained(tiny_pipeline, subfolder="transformer")
    t1 = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    assert all(torch.equal(v, t1.state_dict()[k]) for k, v in t0.state_dict().items())
    v0 = AutoencoderKL.from_pretrained(tiny_pipeline, subfolder="vae")
    v1 = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert all(torch.equal(v, v1.state_dict()[k]) for k, v in v0.state_dict().items())
    assert dict(v1.config)["shift_factor"] == dict(v0.config)["shift_factor"]
    # Cast on export: the same bits as torch's cast of the original weights.
    assert main(["export", str(ckpt), str(tmp_path / "bf16"), "--dtype", "bf16", "--components", "transformer"]) == 0
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir() if p.is_dir()) == ["transformer"]
    t2 = SafetensorsFile(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in t0.state_dict().items():
        assert np.array_equal(t2.get(key).view(np.uint16), _torch_bits(value.to(torch.bfloat16))), key


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_conversion_written_in_pieces_reads_back_equal(tiny_pipeline, tmp_path, dtype):
    # 16 KiB pieces split both components; what loads back is what the default (one piece each) wrote.
    whole, _ = convert(tiny_pipeline, tmp_path / "whole", dtype=dtype, progress=False)
    split, _ = convert(tiny_pipeline, tmp_path / "split", dtype=dtype, progress=False, piece_bytes=16 << 10)
    marker = json.loads((split / "customshift_checkpoint.json").read_text())
    assert marker["version"] == 3
    assert all(len(marker["components"][c]["pieces"]) > 2 for c in ("transformer", "vae"))
    assert all(len(e["pieces"]) == 1 for e in json.loads((whole / "customshift_checkpoint.json").read_text())
               ["components"].values())
    a, b = load_checkpoint(whole), load_checkpoint(split)
    for name in ("transformer", "vae"):
        assert a[name][0] == b[name][0]
        _assert_trees_equal(a[name][1], b[name][1])


def test_single_file_vae_matches_diffusers_single_file_loader(tiny_pipeline, tmp_path):
    from diffusers import AutoencoderKL

    from customshift_jax.models.vae import VAEConfig, vae_params_from_state_dict

    vae = AutoencoderKL.from_pretrained(tiny_pipeline, subfolder="vae")
    config = VAEConfig.from_diffusers_config(dict(vae.config))
    path = tmp_path / "sd3_with_vae.safetensors"
    write_safetensors(path, {VAE_PREFIX + k: v for k, v in vae_to_original(config, vae.state_dict()).items()})
    oracle = AutoencoderKL.from_single_file(str(path), config=str(tiny_pipeline), subfolder="vae")
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in oracle.state_dict().items())
    # Inferred: the tiny pipeline's VAE has SD3's norm groups (32) and scaling, so inference is exact
    # (but for sample_size, a default-resolution hint no tensor states).
    assert main(["convert", str(path), str(tmp_path / "ckpt"), "--no-progress"]) == 0
    (got_config, got), = load_checkpoint(tmp_path / "ckpt", ["vae"]).values()
    assert dataclasses.replace(got_config, sample_size=config.sample_size) == config
    _assert_trees_equal(got, jax.tree_util.tree_map(np.asarray, vae_params_from_state_dict(config,
                                                                                         oracle.state_dict())))


def test_bf16_conversion_equals_torch_cast(tmp_path):
    config = get_preset("tiny-sd3.5-medium")
    model = random_diffusers_transformer(config, seed=4)
    model.save_pretrained(tmp_path / "transformer")
    assert main(["convert", str(tmp_path / "transformer"), str(tmp_path / "ckpt"), "--dtype", "bf16",
                 "--no-progress"]) == 0
    (_, params), = load_checkpoint(tmp_path / "ckpt").values()
    ours = state_dict_from_params(config, params)
    for key, value in model.state_dict().items():
        assert ours[key].dtype == ml_dtypes.bfloat16
        assert np.array_equal(ours[key].view(np.uint16), _torch_bits(value.to(torch.bfloat16))), key
    # Exported bf16 loads in diffusers as the same bf16 tensors.
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    from diffusers import SD3Transformer2DModel

    back = SD3Transformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer", torch_dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value.to(torch.bfloat16)), key


def test_bf16_cast_rounds_to_nearest_even_like_torch():
    # Ties both ways, just-above/below ties, subnormals, overflow to inf, signed zeros, infinities.
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00000001, 0x00018000, 0x807F8000,
                     0x7F7FFFFF, 0x7F7F7FFF, 0xFF7FFFFF, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000],
                    np.uint32)
    rng = np.random.default_rng(0)
    values = np.concatenate([bits.view(np.float32), rng.standard_normal(10000).astype(np.float32) * 1e3,
                             rng.integers(0, 2 ** 32, 10000, dtype=np.uint32).view(np.float32)])
    finite = values[~np.isnan(values)]
    ours = cast_array(finite, np.dtype(ml_dtypes.bfloat16)).view(np.uint16)
    assert np.array_equal(ours, _torch_bits(torch.from_numpy(finite).to(torch.bfloat16)))
    nan = values[np.isnan(values)]
    assert nan.size and np.all(np.isnan(cast_array(nan, np.dtype(ml_dtypes.bfloat16)).astype(np.float32)))
    # fp16 sources go through float32 exactly, then one rounding, as torch does.
    half = rng.standard_normal(10000).astype(np.float16)
    assert np.array_equal(cast_array(half, np.dtype(ml_dtypes.bfloat16)).view(np.uint16),
                          _torch_bits(torch.from_numpy(half).to(torch.bfloat16)))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_release_pages_drops_a_mapped_tensor_from_resident_memory(tmp_path):
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"a": np.ones((64, 1 << 18), np.float32)})  # 64 MiB
    array = SafetensorsFile(path).get("a")
    before = _rss_kib()
    assert float(array.sum()) == 64 * (1 << 18)  # touch every page
    touched = _rss_kib()
    release_pages(array[:, :].T)  # a transposed view of the mapping releases the same range
    released = _rss_kib()
    assert touched - before > 48 * 1024, (before, touched)
    assert touched - released > 48 * 1024, (touched, released)
    assert float(array.sum()) == 64 * (1 << 18)  # still readable: the file is re-read on access
    anonymous = np.ones(1 << 20, np.float32)
    release_pages(anonymous)  # never touches anonymous memory
    assert float(anonymous.sum()) == 1 << 20


def test_progress_bar_shows_tensors_and_rate(capsys):
    bar = Progress(3, 3 << 20, delay=0, mininterval=0)
    for _ in range(3):
        bar.update(1 << 20)
    bar.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "MB/s" in err


def test_progress_bar_in_a_log_file_ends_with_the_final_count(capsys):
    # stderr is not a terminal here: periodic lines are rare, so closing must write the final count.
    bar = Progress(4, 4 << 20, delay=0, mininterval=3600)
    for _ in range(4):
        bar.update(1 << 20)
    assert "4/4" not in capsys.readouterr().err
    bar.close()
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_tiled_fill_of_large_transposed_tensors_is_exact(dtype):
    # Real-width kernels (>= 1M values) are filled tile by tile; edges that are not tile multiples included.
    from customshift_jax.models.mmdit.mapping import fill_tiled

    source = np.random.default_rng(0).standard_normal((1100, 1030)).astype(np.float32)
    target = np.empty((1030, 1100), dtype)
    fill_tiled(target, source.T, cast_array, np.dtype(dtype))
    expected = cast_array(np.ascontiguousarray(source.T), np.dtype(dtype))
    assert np.array_equal(target.view(np.uint8), expected.view(np.uint8))
