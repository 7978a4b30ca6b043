"""CustomShift sampling: the cache computed once equals the RAB recomputed in every step; gamma = 0 is SD3."""
import dataclasses

import jax
import numpy as np
import pytest
from conftest import DOG

from customshift_jax import get_preset, init_mmdit
from customshift_jax.customshift.branches import init_lora, prefill
from customshift_jax.customshift.sampling import make_customshift_sampler
from customshift_jax.io.images import load_reference_image
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.numerics import relative_error
from customshift_jax.sampling import Conditioning, make_sampler, make_schedule

CONFIG = get_preset("tiny-sd3.5-medium")
LORA = LoRAConfig(rank=4, alpha=4.0)


def _random(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([0.05 * jax.random.normal(k, x.shape) for k, x in
                              zip(jax.random.split(key, len(leaves)), leaves)])


@pytest.fixture(scope="module")
def setup():
    params = init_mmdit(CONFIG, jax.random.key(0))
    rab = _random(init_lora(CONFIG, LORA, jax.random.key(1), branch="rab"), jax.random.key(2))
    cgb = _random(init_lora(CONFIG, LORA, jax.random.key(3), branch="cgb"), jax.random.key(4))
    rng = np.random.default_rng(0)
    j, p = CONFIG.joint_attention_dim, CONFIG.pooled_projection_dim
    cond = Conditioning(*(rng.standard_normal(s).astype(np.float32) for s in [(2, 6, j), (2, p), (2, 6, j), (2, p)]))
    ref = (rng.standard_normal((1, 16, 8, 8)).astype(np.float32), rng.standard_normal((1, 4, j)).astype(np.float32),
           rng.standard_normal((1, p)).astype(np.float32))
    latents = rng.standard_normal((2, 16, 8, 12)).astype(np.float32)
    schedule = make_schedule({"shift": 3.0}, 4)
    return params, rab, cgb, cond, ref, latents, schedule


def test_cached_equals_recomputed_rab_every_step(setup):
    params, rab, cgb, cond, ref, latents, schedule = setup
    cache = prefill(CONFIG, params, *ref, rab_lora=rab, lora_config=LORA)
    cached = make_customshift_sampler(CONFIG, LORA)(
        {"base": params, "cgb": cgb}, latents, cond, schedule, guidance_scale=4.0,
        extra={"ref_kv": cache.kv, "gamma": 1.3})
    recomputed = make_customshift_sampler(CONFIG, LORA, recompute_rab=True)(
        {"base": params, "cgb": cgb, "rab": rab}, latents, cond, schedule, guidance_scale=4.0,
        extra={"ref_latents": ref[0], "subject_embeds": ref[1], "subject_pooled": ref[2], "gamma": 1.3})
    assert relative_error(cached, recomputed) <= 1e-6
    base = make_sampler(CONFIG)(params, latents, cond, schedule, guidance_scale=4.0)
    assert relative_error(cached, base) > 1e-3  # the reference matters


def test_gamma_zero_with_zero_lora_is_base_sd3(setup):
    params, _, _, cond, ref, latents, schedule = setup
    cache = prefill(CONFIG, params, *ref)
    zero = init_lora(CONFIG, LORA, jax.random.key(5), branch="cgb")
    out = make_customshift_sampler(CONFIG, LORA)({"base": params, "cgb": zero}, latents, cond, schedule,
                                                 guidance_scale=4.0, extra={"ref_kv": cache.kv, "gamma": 0.0})
    base = make_sampler(CONFIG)(params, latents, cond, schedule, guidance_scale=4.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_reference_image_reading(tmp_path):
    image = load_reference_image(DOG, 48, 32)
    assert image.shape == (1, 3, 48, 32) and image.dtype == np.float32
    assert -1.0 <= image.min() < image.max() <= 1.0
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg cannot be read"):
        load_reference_image(bad, 32, 32)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_reference_image(tmp_path / "absent.png", 32, 32)


def _two_references(params, rab):
    """A cache holding a different reference per sample (batch 2)."""
    rng = np.random.default_rng(7)
    j, p = CONFIG.joint_attention_dim, CONFIG.pooled_projection_dim
    ref = (rng.standard_normal((2, 16, 8, 8)).astype(np.float32), rng.standard_normal((2, 4, j)).astype(np.float32),
           rng.standard_normal((2, p)).astype(np.float32))
    return prefill(CONFIG, params, *ref, rab_lora=rab, lora_config=LORA).kv


def test_one_reference_per_sample_under_cfg_equals_each_sample_alone(setup):
    """CFG runs [uncond; text] (2B) against B references: sample i of both halves reads reference i."""
    params, rab, cgb, cond, _, latents, schedule = setup
    kv = _two_references(params, rab)
    run = make_customshift_sampler(CONFIG, LORA)
    both = run({"base": params, "cgb": cgb}, latents, cond, schedule, guidance_scale=4.0,
               extra={"ref_kv": kv, "gamma": 1.3})
    for i in range(2):
        one = Conditioning(*(getattr(cond, f.name)[i:i + 1] for f in dataclasses.fields(cond)))
        kv_i = jax.tree_util.tree_map(lambda a: a[:, i:i + 1], kv)  # (layers, batch, ...): reference i
        alone = run({"base": params, "cgb": cgb}, latents[i:i + 1], one, schedule, guidance_scale=4.0,
                    extra={"ref_kv": kv_i, "gamma": 1.3})
        assert relative_error(both[i:i + 1], alone) <= 1e-5, i


def test_reference_guidance(setup):
    """v_without + s (v_with - v_without): s = 1 is the plain sampler, s = 0 the sampler without the reference
    (gamma 0), s = 2 neither; the baselines, which ignore gamma, refuse it."""
    params, rab, cgb, cond, _, latents, schedule = setup
    kv = _two_references(params, rab)
    run = make_customshift_sampler(CONFIG, LORA)
    go = lambda gamma, **extra: run({"base": params, "cgb": cgb}, latents, cond, schedule,  # noqa: E731
                                    guidance_scale=4.0, extra={"ref_kv": kv, "gamma": gamma, **extra})
    plain, without = go(1.3), go(0.0)
    assert relative_error(go(1.3, reference_scale=1.0), plain) <= 1e-5
    assert relative_error(go(1.3, reference_scale=0.0), without) <= 1e-5
    pushed = go(1.3, reference_scale=2.0)
    assert relative_error(pushed, plain) > 1e-3 and relative_error(pushed, without) > 1e-3
    with pytest.raises(ValueError, match="shift='concat' ignores"):
        make_customshift_sampler(CONFIG, LORA, shift="concat")(
            {"base": params, "cgb": cgb}, latents, cond, schedule, guidance_scale=4.0,
            extra={"ref_kv": kv, "gamma": 1.0, "reference_scale": 2.0})
