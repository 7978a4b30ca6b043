"""Samples during training: compiled once, fixed noise (same LoRAs, same images), written at the configured steps
(PNGs and TensorBoard images), decoded by a VAE when configured, and without any effect on training itself:
a run with sampling, interrupted and resumed, ends bit-identical to a straight run without sampling."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from train_fixtures import ROOT, write_synthetic_dataset

from customshift_jax.train.config import load_config

CONFIG = ROOT / "train" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("samples") / "data")


def _cfg(data: Path, out: Path, *overrides: str) -> dict:
    return load_config(CONFIG, [f"data.path={data}", f"output_dir={out}", "log.progress=false", *overrides])


def _perturbed(trainable, scale: float):
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_sampler_compiles_once_and_fixed_noise(data, tmp_path, tiny_pipeline_dir_no_text):
    from customshift_jax.train.loop import build
    from customshift_jax.train.metrics import MetricsLogger, read_events
    from customshift_jax.train.samples import TrainingSampler

    cfg = _cfg(data, tmp_path, "sample.every=1", "sample.prompts=[0, 2]", "sample.reference=1", "sample.steps=3",
               "sample.guidance=2.0", f"sample.vae={tiny_pipeline_dir_no_text}")
    parts = build(cfg)
    sampler = TrainingSampler(cfg, parts.config, parts.lora_config, parts.dataset, tmp_path)
    trainable, base = parts.state.trainable, parts.base
    metrics = MetricsLogger(tmp_path)
    a = sampler(trainable, base, 3, metrics)
    b = sampler(_perturbed(trainable, 0.05), base, 6, metrics)
    c = sampler(trainable, base, 9, metrics)
    metrics.close()
    assert a.shape == (2, 3, 16, 16) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))  # 8x8 latents, VAE x2
    np.testing.assert_array_equal(a, c)  # same LoRAs: same samples (fixed noise, nothing else drawn)
    assert np.max(np.abs(a - b)) > 1e-3  # the samples follow the LoRAs
    pipe = sampler.pipe
    assert pipe.customshift_sampler().jitted._cache_size() == 1 and pipe.prefill_function()._cache_size() == 1
    for step in (3, 6, 9):
        assert sorted(p.name for p in (tmp_path / "samples" / f"step-{step:06d}").iterdir()) == ["00.png", "01.png"]
    (ev,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    images = read_events(ev, images=True)
    assert [s for s, _ in images] == [3, 6, 9] and sorted(images[0][1]) == ["samples/00", "samples/01"]
    assert images[2][1]["samples/01"] == (tmp_path / "samples" / "step-000009" / "01.png").read_bytes()


def test_sample_inputs_and_config_errors(data, tmp_path, tiny_pipeline_dir_no_text):
    from PIL import Image

    from customshift_jax.io.loading import load_vae
    from customshift_jax.train.data import ShardDataset
    from customshift_jax.train.samples import sample_inputs

    ds = ShardDataset(data)
    base = _cfg(data, tmp_path)["sample"]
    with pytest.raises(ValueError, match=r"sample.reference = 9: expected a record index in 0..3"):
        sample_inputs({**base, "reference": 9}, ds, None)
    with pytest.raises(ValueError, match="set sample.vae"):
        sample_inputs({**base, "reference": "dog.png"}, ds, None)
    with pytest.raises(FileNotFoundError, match="sample.embeds"):
        sample_inputs({**base, "embeds": str(tmp_path / "none.npz")}, ds, None)
    np.savez(tmp_path / "e.npz", prompt_embeds=np.ones((3, 6, 32), np.float32), pooled_prompt_embeds=np.ones((3, 24)))
    got = sample_inputs({**base, "embeds": str(tmp_path / "e.npz"), "prompts": [2, 0]}, ds, None)
    assert got.prompt_embeds.shape == (2, 6, 32) and not got.negative_embeds.any()  # zeros: the unconditional
    np.testing.assert_array_equal(got.ref_latents[0], ds.get(0)["ref_latents"])
    # An image reference, encoded by the VAE at the prepared latent size; the subject name from a record.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(tmp_path / "ref.png")
    got = sample_inputs({**base, "reference": str(tmp_path / "ref.png"), "subject": 2, "prompts": [1]}, ds,
                        load_vae(tiny_pipeline_dir_no_text))
    assert got.ref_latents.shape == (1, 16, 8, 8) and np.all(np.isfinite(got.ref_latents))
    np.testing.assert_array_equal(got.subject_embeds[0], ds.get(2)["subject_embeds"])
    with pytest.raises(ValueError, match="subject name's embeddings"):
        sample_inputs({**base, "reference": str(tmp_path / "ref.png")}, ds, load_vae(tiny_pipeline_dir_no_text))


def test_samples_at_their_steps_and_training_unchanged_by_sampling_and_resume(data, tmp_path):
    from customshift_jax.train.loop import final_trainable, train
    from customshift_jax.train.metrics import read_events

    common = ("train.steps=12", "checkpoint.every=4")
    assert train(_cfg(data, tmp_path / "plain", *common), log=lambda *_: None) == 0
    sampled = tmp_path / "sampled"
    sample = ("sample.every=3", "sample.steps=2", "sample.prompts=[0, 1, 2]")
    assert train(_cfg(data, sampled, "train.steps=7", "checkpoint.every=4", *sample), log=lambda *_: None) == 0
    assert train(_cfg(data, sampled, *common, *sample), resume=True, log=lambda *_: None) == 0
    a, b = final_trainable(tmp_path / "plain"), final_trainable(sampled)
    assert a["step"] == b["step"] == 12 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"leaf {k}: sampling or resume changed training")
    steps = sorted(p.name for p in (sampled / "samples").iterdir())
    assert steps == ["step-000003", "step-000006", "step-000009", "step-000012"]
    for s in steps:
        z = np.load(sampled / "samples" / s / "latents.npy")
        assert z.shape == (3, 16, 8, 8) and np.all(np.isfinite(z))
        assert len(list((sampled / "samples" / s).glob("*.png"))) == 3
    assert not (tmp_path / "plain" / "samples").exists()
    logged = [s for ev in sorted((sampled / "tb").glob("events.*")) for s, _ in read_events(ev, images=True)]
    assert logged == [3, 6, 9, 12]
