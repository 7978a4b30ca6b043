"""CustomShift in JAX: the two CADS forms agree, gamma = 0 and no cache give the base model, LoRA merges."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customshift_jax import MMDiTConfig, get_preset, init_mmdit, mmdit_apply
from customshift_jax.customshift.branches import customshift_apply, init_lora, prefill
from customshift_jax.customshift.cads import cads_attention, shift_logit
from customshift_jax.models.mmdit.attention import attention
from customshift_jax.models.mmdit.lora import LoRAConfig, merge_lora
from customshift_jax.numerics import relative_error

TINY = ["tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large"]
LORA = LoRAConfig(rank=4, alpha=8.0)


def randomize(tree, key, scale):
    """Non-zero LoRA factors and beta, so that a bug cannot hide behind B = 0."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=TINY)
def setup(request):
    config = get_preset(request.param)
    params = init_mmdit(config, jax.random.key(0))
    rab = randomize(init_lora(config, LORA, jax.random.key(1), branch="rab"), jax.random.key(2), 0.05)
    cgb = randomize(init_lora(config, LORA, jax.random.key(3), branch="cgb"), jax.random.key(4), 0.05)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    subject = rng.standard_normal((1, 5, config.joint_attention_dim)).astype(np.float32)
    subject_pooled = rng.standard_normal((1, config.pooled_projection_dim)).astype(np.float32)
    cache = prefill(config, params, ref, subject, subject_pooled, rab_lora=rab, lora_config=LORA)
    inputs = (rng.standard_normal((2, 16, 12, 8)).astype(np.float32), np.array([100.0, 700.0], np.float32),
              rng.standard_normal((2, 7, config.joint_attention_dim)).astype(np.float32),
              rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32))
    return config, params, rab, cgb, cache, inputs


def test_cache_holds_every_layer(setup):
    config, _, _, _, cache, _ = setup
    layers = sum(k.shape[0] for k, _ in cache.kv.values())
    assert layers == config.num_layers
    for k, v in cache.kv.values():
        assert k.shape[1:] == (1, 16 + 5, config.num_attention_heads, config.attention_head_dim)  # R = 4 x 4
        assert k.shape == v.shape


def test_two_forms_agree(setup):
    config, params, _, cgb, cache, inputs = setup
    a = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, gamma=0.7, form="two_pass")
    b = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, gamma=0.7, form="single")
    assert relative_error(a, b) <= 1e-6


def test_reference_changes_the_output_and_gamma_zero_removes_it(setup):
    config, params, _, cgb, cache, inputs = setup
    without = customshift_apply(config, params, *inputs, None, cgb_lora=cgb, lora_config=LORA)
    shifted = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, gamma=1.0)
    gamma0 = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, gamma=0.0)
    assert relative_error(shifted, without) > 1e-3
    np.testing.assert_array_equal(np.asarray(gamma0), np.asarray(without))


def test_no_cache_zero_lora_is_exactly_the_base_forward(setup):
    config, params, _, _, _, inputs = setup
    zero = init_lora(config, LORA, jax.random.key(9), branch="cgb")  # B = 0, beta = 0
    out = customshift_apply(config, params, *inputs, None, cgb_lora=zero, lora_config=LORA)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mmdit_apply(config, params, *inputs)))


def test_concat_ignores_beta_and_equals_cads_at_beta_zero_gamma_one(setup):
    config, params, _, cgb, cache, inputs = setup
    concat = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, shift="concat",
                               gamma=3.0)
    no_beta = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("['beta']") else x, cgb)
    cads = customshift_apply(config, params, *inputs, cache, cgb_lora=no_beta, lora_config=LORA, gamma=1.0)
    assert relative_error(concat, cads) <= 1e-6
    with_beta = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, gamma=1.0)
    assert relative_error(with_beta, cads) > 1e-4  # the learned beta acts (LORA says nothing of beta)


def test_merged_lora_equals_lora_path(setup):
    config, params, _, cgb, _, inputs = setup
    with_lora = customshift_apply(config, params, *inputs, None, cgb_lora=cgb, lora_config=LORA)
    merged = mmdit_apply(config, merge_lora(params, cgb, LORA), *inputs)
    assert relative_error(merged, with_lora) <= 1e-5


def test_concat_is_one_softmax_over_base_and_reference():
    # Attention level: lambda = 0 is a single softmax over [B; R] for the image queries.
    rng = np.random.default_rng(1)
    b, n_img, n_txt, r, h, d = 2, 6, 3, 5, 2, 8
    q = jnp.asarray(rng.standard_normal((b, n_img + n_txt, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n_img + n_txt, h, d)), jnp.float32) for _ in range(2))
    kr, vr = (jnp.asarray(rng.standard_normal((1, r, h, d)), jnp.float32) for _ in range(2))
    lam = shift_logit(jnp.asarray([0.3, -0.2]), 1.0, "concat")
    out = cads_attention(q, k, v, kr, vr, lam, n_img)
    full_k = jnp.concatenate([k, jnp.broadcast_to(kr, (b, r, h, d))], axis=1)
    full_v = jnp.concatenate([v, jnp.broadcast_to(vr, (b, r, h, d))], axis=1)
    expected_img = jax.nn.dot_product_attention(q[:, :n_img], full_k, full_v)
    assert relative_error(out[:, :n_img], expected_img) <= 1e-6
    assert relative_error(out[:, n_img:], attention(q, k, v)[:, n_img:]) <= 1e-6  # text: base keys only


def test_shift_logit_follows_gamma():
    beta = jnp.asarray([0.5, -1.0])
    np.testing.assert_allclose(shift_logit(beta, 2.0), beta + np.log(2.0), rtol=1e-6)
    assert np.all(np.isneginf(shift_logit(beta, 0.0)))
    with pytest.raises(ValueError, match="unknown shift"):
        shift_logit(beta, 1.0, "softmax")


def test_bad_cache_and_bad_lora_are_refused(setup):
    config, params, _, cgb, cache, inputs = setup
    other = MMDiTConfig.from_diffusers_config({**config.to_diffusers_config(), "num_layers": config.num_layers + 1})
    other_params = init_mmdit(other, jax.random.key(0))
    with pytest.raises(ValueError, match="another model configuration"):
        customshift_apply(other, other_params, *inputs, cache)
    wrong_rank = init_lora(config, LoRAConfig(rank=2, alpha=2.0), jax.random.key(0), branch="cgb")
    with pytest.raises(ValueError, match="rank 4"):
        customshift_apply(config, params, *inputs, cache, cgb_lora=wrong_rank, lora_config=LORA)
    other_lora = init_lora(other, LORA, jax.random.key(0), branch="cgb")
    with pytest.raises(ValueError, match="does not fit this model"):
        customshift_apply(config, params, *inputs, cache, cgb_lora=other_lora, lora_config=LORA)


@pytest.mark.parametrize("form", ["two_pass", "single"])
def test_per_sample_gamma_matches_scalar_gamma_per_sample(setup, form):
    # Per-sample reference dropout: sample 0 dropped (gamma 0), sample 1 kept (gamma 1), in one batch, gives each
    # sample what the whole batch gives with that gamma as a scalar: bit for bit in the two-pass form (training's);
    # the single form's (B, H) bias fuses differently, so there the kept sample agrees to rounding (the dropped
    # one is exact). Compared at the same batch shape: a batch of one differs from a batch of two by XLA's
    # rounding (~1e-6), whatever gamma is.
    config, params, _, cgb, cache, inputs = setup
    run = lambda gamma, c=cache: np.asarray(customshift_apply(  # noqa: E731
        config, params, *inputs, c, cgb_lora=cgb, lora_config=LORA, gamma=gamma, form=form))
    mixed = run(jnp.asarray([0.0, 1.0]))
    np.testing.assert_array_equal(mixed[0], run(0.0)[0])
    if form == "two_pass":
        np.testing.assert_array_equal(mixed[1], run(1.0)[1])
        np.testing.assert_array_equal(mixed[0], run(1.0, None)[0])  # gamma 0 is no reference, bit for bit
    else:  # one softmax over [B; R] with a -inf bias: no reference up to rounding, as with a scalar gamma 0
        assert relative_error(mixed[1], run(1.0)[1]) <= 1e-6
    assert relative_error(mixed[1], run(0.0)[1]) > 1e-3  # the kept sample does read the reference
    with pytest.raises(ValueError, match="one value per sample"):
        run(jnp.ones((2, 1)))


@pytest.mark.parametrize("form", ["two_pass", "single"])
def test_joint_lets_text_queries_read_the_reference(form):
    """shift="joint" (OminiControl-style): every query attends over [B; R] unshifted, so the text rows equal one
    plain attention over the joined keys, and the image rows equal concat's (image queries read R alike)."""
    rng = np.random.default_rng(3)
    b, n_img, n_txt, r, h, d = 2, 6, 4, 5, 2, 8
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v = f(b, n_img + n_txt, h, d), f(b, n_img + n_txt, h, d), f(b, n_img + n_txt, h, d)
    k_ref, v_ref = f(1, r, h, d), f(1, r, h, d)
    lam = shift_logit(jnp.full((h,), 0.7), 2.0, "joint")
    np.testing.assert_array_equal(np.asarray(lam), 0.0)  # no beta, no gamma: the baseline's plain join
    joint = cads_attention(q, k, v, k_ref, v_ref, lam, n_img + n_txt, form=form)
    concat = cads_attention(q, k, v, k_ref, v_ref, lam, n_img, form=form)
    join = lambda x, x_ref: jnp.concatenate([x, jnp.repeat(x_ref, b, 0)], 1)  # noqa: E731
    joined = attention(q, join(k, k_ref), join(v, v_ref))
    assert relative_error(joint, joined) <= 1e-6
    assert relative_error(joint[:, :n_img], concat[:, :n_img]) <= 1e-6
    assert relative_error(joint[:, n_img:], concat[:, n_img:]) > 1e-2  # concat's text rows never see R


def test_joint_processor_changes_the_text_stream(setup):
    """Through the model: "joint" differs from "concat" (text tokens read the reference from the first block on,
    which reaches the image through the later blocks), and both ignore gamma."""
    config, params, _, cgb, cache, inputs = setup
    joint = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, shift="joint")
    joint3 = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, shift="joint",
                               gamma=3.0)
    concat = customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=LORA, shift="concat")
    np.testing.assert_array_equal(np.asarray(joint), np.asarray(joint3))
    assert relative_error(joint, concat) > 1e-4
