"""The Flax MMDiT equals diffusers' SD3Transformer2DModel at fp32 (DESIGN section 7: rel err <= 1e-5)."""
import numpy as np
import pytest

from customshift_jax import MMDiTConfig, get_preset
from customshift_jax.crosscheck.mmdit import crosscheck_model, random_diffusers_transformer

TOL = 1e-5
TINY = ["tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large"]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    config = get_preset(request.param)
    return request.param, config, random_diffusers_transformer(config, seed=3)


def test_tiny_presets_keep_the_real_structure():
    for name in TINY:
        cfg = get_preset(name)
        assert cfg.pos_embed_max_size > 12 // cfg.patch_size, "test latents must be cropped from a larger grid"
    assert get_preset("tiny-sd3.5-medium").block_groups() == ((0, 2), (2, 3), (3, 4))
    assert get_preset("tiny-sd3.5-medium").qk_norm == "rms_norm"
    assert get_preset("tiny-sd3-medium").qk_norm is None


def test_full_forward_matches_diffusers(tiny):
    # Non-square latents smaller than pos_embed_max_size, batch 3, one timestep per sample, skip_layers.
    name, config, model = tiny
    r = crosscheck_model(name, config, model, batch=3, height=12, width=8, seed=1, skip_layers=[1])
    assert r.shape == (3, 16, 12, 8)
    assert r.rel <= TOL, f"{name}: relative error {r.rel:.2e}"


def test_skip_layers_change_the_output(tiny):
    # Guards the test above: skipping a block must matter, or skip_layers parity proves nothing.
    name, config, model = tiny
    from customshift_jax.crosscheck.mmdit import ForwardInputs, jax_forward
    from customshift_jax.models.mmdit.mapping import params_from_state_dict

    params = params_from_state_dict(config, model.state_dict())
    inputs = ForwardInputs.random(config, batch=2, height=8, width=12, seed=2)
    full, _ = jax_forward(config, params, inputs)
    skipped, _ = jax_forward(config, params, inputs, skip_layers=[1])
    assert np.max(np.abs(full - skipped)) > 1e-3


def test_per_block_parity_for_every_block_kind():
    # tiny-sd3.5-medium holds all three kinds: dual attention (0, 1), plain (2), context_pre_only (3).
    config = get_preset("tiny-sd3.5-medium")
    model = random_diffusers_transformer(config, seed=5)
    r = crosscheck_model("tiny-sd3.5-medium", config, model, batch=2, height=8, width=12, seed=4, per_block=True)
    assert [row[0] for row in r.per_block] == [0, 1, 2, 3]
    for index, err_x, err_c in r.per_block:
        assert err_x <= TOL, f"block {index} image stream: {err_x:.2e}"
        assert err_c is None or err_c <= TOL, f"block {index} text stream: {err_c:.2e}"
    assert r.per_block[-1][2] is None  # the context_pre_only block has no text output
    assert r.rel <= TOL


def test_sd3_medium_width_two_layers():
    # The real SD3-medium width: 24 heads of 64, joint_attention_dim 4096, pooled 2048; 2 layers.
    config = MMDiTConfig.from_diffusers_config({
        **get_preset("sd3-medium").to_diffusers_config(), "num_layers": 2})
    assert config.inner_dim == 1536
    model = random_diffusers_transformer(config, seed=7)
    r = crosscheck_model("sd3-medium-2-layers", config, model, batch=2, height=12, width=8, seed=3,
                         skip_layers=[0])
    assert r.rel <= TOL, f"relative error {r.rel:.2e}"


def test_bf16_forward_runs_and_stays_close():
    # bf16 params and compute (softmax, norms in fp32): within bf16 round-off of the fp32 PyTorch output.
    import jax
    import jax.numpy as jnp

    from customshift_jax.crosscheck.mmdit import ForwardInputs, jax_forward, torch_forward
    from customshift_jax.models.mmdit.mapping import params_from_state_dict

    config = get_preset("tiny-sd3.5-medium")
    model = random_diffusers_transformer(config, seed=2)
    inputs = ForwardInputs.random(config, batch=2, height=12, width=8, seed=0)
    expected, _ = torch_forward(model, inputs)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16),
                                    params_from_state_dict(config, model.state_dict()))
    out, _ = jax_forward(config, params, inputs, dtype="bfloat16")
    from customshift_jax.numerics import relative_error

    err = relative_error(out, expected)
    assert np.all(np.isfinite(out))
    assert 1e-4 < err < 3e-2, f"bf16 error {err:.2e}: too large, or too small to be bf16"
