"""`customshift generate` checks its numbers: bad flags, non-finite / damaged LoRA files, NaN latents are one line."""
import json

import numpy as np
import pytest
from conftest import DOG

from customshift_jax.cli.main import main

SIZE = ["--height", "16", "--width", "24"]  # tiny VAE scale 2 x patch 2: latents 8 x 12


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir):
    """The tiny pipeline converted to our checkpoint (session fixture)."""
    return tiny_checkpoint_dir


@pytest.fixture(scope="module")
def embeds(embeds_with_subject):
    """An --embeds file for two prompts with the subject's embeddings: no text encoders at generate time."""
    return embeds_with_subject


def generate_argv(checkpoint, embeds, out, *extra):
    """A one-step CustomShift run on the tiny checkpoint."""
    return ["generate", "--checkpoint", str(checkpoint), "--embeds", str(embeds), *SIZE, "--steps", "1",
            "--reference", str(DOG), "--out", str(out), *extra]


def _fails_in_one_line(capsys, argv, out) -> str:
    """Run the CLI; it must exit 2 with exactly one `error: ...` line, last, no traceback, and no PNG."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert not (out.exists() and list(out.glob("*.png"))), list(out.glob("*.png"))
    return lines[-1]


def _lora_folder(checkpoint, path, seed: int = 0):
    """A CustomShift LoRA folder (the three files) from random trees fitting the tiny checkpoint."""
    import jax

    from customshift_jax.customshift.branches import init_lora
    from customshift_jax.io.checkpoint import load_checkpoint
    from customshift_jax.io.lora_files import save_lora_files, to_state_dict
    from customshift_jax.models.mmdit.lora import LoRAConfig

    config = load_checkpoint(checkpoint, ["transformer"])["transformer"][0]
    lora = LoRAConfig(rank=2, alpha=2.0)
    rng = np.random.default_rng(seed)
    rand = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: (0.01 * rng.standard_normal(x.shape)).astype(np.float32), t)
    trees = [rand(init_lora(config, lora, jax.random.key(i), branch=b)) for i, b in enumerate(("rab", "cgb"))]
    save_lora_files(path, to_state_dict(*trees), lora)
    return path


def _rewrite(path, *, tensor_key=None, value=None, meta_update=None):
    """Rewrite one safetensors file with one tensor's first entry set to `value` and/or its metadata updated."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    if tensor_key is not None:
        tensors[tensor_key].reshape(-1)[0] = value
    if meta_update is not None:
        ours = json.loads(metadata["customshift_lora"])
        metadata["customshift_lora"] = json.dumps({**ours, **meta_update})
    save_file(tensors, str(path), metadata=metadata)


# Row 1: --gamma must be finite and >= 0 (log(gamma) in CADS: NaN latents, black PNG before).
@pytest.mark.parametrize("gamma", ["-1", "nan", "inf"])
def test_bad_gamma_is_one_line(gamma, checkpoint, embeds, tmp_path, capsys):
    out = tmp_path / "o"
    line = _fails_in_one_line(capsys, generate_argv(checkpoint, embeds, out, "--gamma", gamma), out)
    assert line.startswith("error: --gamma ") and "finite number >= 0" in line, line


# Row 2: non-finite LoRA tensors, beta or alpha name the tensor / metadata and the file.
@pytest.mark.parametrize("case", ["lora_nan", "lora_inf", "beta_nan", "alpha_nan"])
def test_non_finite_lora_is_one_line(case, checkpoint, embeds, tmp_path, capsys):
    from customshift_jax.io.lora_files import BETA_FILE, CGB_FILE, RAB_FILE

    folder = _lora_folder(checkpoint, tmp_path / "lora")
    if case == "alpha_nan":
        name, key = CGB_FILE, "alpha nan"
        _rewrite(folder / name, meta_update={"alpha": float("nan")})
    else:
        name = BETA_FILE if case == "beta_nan" else RAB_FILE
        key = ("transformer_blocks.0.attn.cads_beta" if case == "beta_nan"
               else "transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
        _rewrite(folder / name, tensor_key=key, value=np.inf if case == "lora_inf" else np.nan)
    out = tmp_path / "o"
    line = _fails_in_one_line(capsys, generate_argv(checkpoint, embeds, out, "--lora", str(folder)), out)
    assert line.startswith("error: --lora: ") and str(folder / name) in line and key in line, line


# Row 3: a truncated LoRA file is named, not a SafetensorError traceback.
def test_truncated_lora_file_is_one_line(checkpoint, embeds, tmp_path, capsys):
    from customshift_jax.io.lora_files import CGB_FILE

    folder = _lora_folder(checkpoint, tmp_path / "lora")
    data = (folder / CGB_FILE).read_bytes()
    (folder / CGB_FILE).write_bytes(data[: len(data) // 2])
    out = tmp_path / "o"
    line = _fails_in_one_line(capsys, generate_argv(checkpoint, embeds, out, "--lora", str(folder)), out)
    assert line.startswith("error: --lora: ") and str(folder / CGB_FILE) in line, line
    assert "damaged or truncated" in line and "re-export it" in line, line


# Row 4: --seed is checked against what jax.random.key tells apart (0 .. 2**32 - 1 without x64).
@pytest.mark.parametrize("seed", [str(2**70), "-1", str(2**32)])
def test_out_of_range_seed_is_one_line(seed, checkpoint, embeds, tmp_path, capsys):
    out = tmp_path / "o"
    line = _fails_in_one_line(capsys, generate_argv(checkpoint, embeds, out, "--seed", seed), out)
    assert line.startswith(f"error: --seed {seed} is out of range") and "4294967295" in line, line


def test_seed_range_is_what_jax_tells_apart():
    """The bound is real: the largest seed works and differs from 0; one past it aliases seed 0."""
    import jax

    from customshift_jax.cli.generate_cmd import SEED_MAX, check_seed

    check_seed(0)
    check_seed(SEED_MAX)
    data = lambda s: np.asarray(jax.random.key_data(jax.random.key(s)))  # noqa: E731
    assert not np.array_equal(data(SEED_MAX), data(0))
    assert jax.config.jax_enable_x64 or np.array_equal(data(SEED_MAX + 1), data(0))


# Row 5: non-finite latents stop before decoding, naming the prompt; no PNG.
def test_non_finite_latents_check():
    from customshift_jax.pipeline import check_finite_latents

    check_finite_latents(np.zeros((2, 16, 8, 12), np.float32), 0, 3)
    z = np.zeros((2, 16, 8, 12), np.float32)
    z[1, 3, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"prompt 2 of 3 gave non-finite latents \(1 of 3072"):
        check_finite_latents(z, 1, 3)


def test_nan_sampler_writes_no_png(checkpoint, embeds, tmp_path, capsys, monkeypatch):
    """Wired into the CLI: a sampler returning NaN ends the run in one line, before any PNG."""
    from customshift_jax import pipeline

    def nan_sampler(*_args, **_kwargs):
        return lambda params, *, latents=None, **kw: np.full((1, 16, 8, 12), np.nan, np.float32)

    monkeypatch.setattr(pipeline, "make_sampler", nan_sampler)  # the sampler the pipeline builds
    out = tmp_path / "o"
    argv = ["generate", "--checkpoint", str(checkpoint), "--embeds", str(embeds), *SIZE, "--steps", "1",
            "--guidance", "1", "--out", str(out)]
    line = _fails_in_one_line(capsys, argv, out)
    assert "prompt 1 of 2 gave non-finite latents" in line and "no PNG written" in line, line

