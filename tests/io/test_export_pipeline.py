"""`customshift export` writes a whole pipeline folder: `StableDiffusion3Pipeline.from_pretrained(DST)` loads it
in one call and samples what the original pipeline samples; the LoRA goes beside it."""
import numpy as np
import pytest
import torch

from customshift_jax.cli.main import main
from customshift_jax.io.lora_files import save_lora_files
from customshift_jax.models.mmdit.lora import LoRAConfig


def _latents(pipe):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(prompt="a dog on the beach", num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                    generator=generator, output_type="latent").images.numpy()


def test_export_is_a_pipeline_diffusers_loads_in_one_call(tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert main(["convert", str(tiny_pipeline_dir), str(ckpt), "--no-progress"]) == 0
    lora = tmp_path / "lora"  # export checks it (intact, finite) and copies it
    save_lora_files(lora, {"transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 16), np.float32),
                           "transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((16, 2), np.float32)},
                    LoRAConfig(rank=2, alpha=2.0))
    assert main(["export", str(ckpt), str(out), "--text-encoders", str(tiny_pipeline_dir), "--lora", str(lora)]) == 0
    assert (out / "model_index.json").is_file() and (out / "lora" / "customshift_cgb.safetensors").is_file()
    exported = StableDiffusion3Pipeline.from_pretrained(out)
    original = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir)
    a, b = _latents(exported), _latents(original)
    assert np.isfinite(a).all() and np.array_equal(a, b)


@pytest.mark.parametrize("extra, message", [
    (["--text-encoders", "NOPE"], "no model_index.json"),
    (["--lora", "EMPTY"], "no customshift_*.safetensors"),
    (["--components", "transformer", "--lora", "EMPTY"], "make a whole pipeline folder"),
])
def test_export_pipeline_refusals(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(tiny_pipeline_dir), str(ckpt), "--no-progress", "--components", "transformer,vae"]) == 0
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / e) if e in ("NOPE", "EMPTY") else e for e in extra]
    capsys.readouterr()
    assert main(["export", str(ckpt), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "out").exists(), err
