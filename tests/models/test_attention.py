"""The query-blocked attention backend equals the one-shot einsum attention, with and without a bias and the
LSE, and an MMDiT forward on it equals the default backend (the block is made small so tiny shapes split)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from customshift_jax.customshift.cads import cads_attention
from customshift_jax.models.mmdit import attention as attn
from customshift_jax.models.mmdit.api import init_mmdit, make_forward, skip_mask
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.options import RunOptions


def _qkv(b=2, nq=37, nk=29, h=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (nq, nk, nk)]


@pytest.fixture
def small_block(monkeypatch):
    monkeypatch.setattr(attn, "QUERY_BLOCK", 8)  # 37 queries -> 5 blocks, the last one padded


@pytest.mark.parametrize("bias_shape", [None, (29,), (3, 1, 29), (2, 3, 37, 29), (1, 1, 37, 1)])
def test_blocked_equals_one_shot(small_block, bias_shape):
    q, k, v = _qkv()
    bias = None
    if bias_shape is not None:
        bias = jnp.asarray(np.random.default_rng(1).standard_normal(bias_shape), jnp.float32)
    out, lse = attn.attention(q, k, v, bias=bias, backend="xla", return_lse=True)
    out_b, lse_b = jax.jit(lambda *a: attn.attention(*a, bias=bias, backend="blocked", return_lse=True))(q, k, v)
    assert out_b.shape == out.shape and lse_b.shape == lse.shape
    assert rel_err(out_b, out) <= 1e-6 and rel_err(lse_b, lse) <= 1e-6


def test_blocked_masked_rows_and_short_queries(small_block):
    """-inf bias columns (CustomShift form (b) masks the text rows from the reference) and Nq <= block."""
    q, k, v = _qkv(nq=40, nk=12)
    k_ref, v_ref = _qkv(nq=1, nk=10, seed=2)[1:]
    lam = jnp.asarray([0.3, -0.2, 0.1], jnp.float32)
    want = cads_attention(q, k, v, k_ref, v_ref, lam, 24, form="single", backend="xla")
    got = cads_attention(q, k, v, k_ref, v_ref, lam, 24, form="single", backend="blocked")
    assert bool(jnp.all(jnp.isfinite(got))) and rel_err(got, want) <= 1e-6
    q, k, v = _qkv(nq=5)
    assert rel_err(attn.attention(q, k, v, backend="blocked"), attn.attention(q, k, v)) == 0.0


def test_unknown_backend_and_lse_from_fused_backend_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.attention(q, k, v, backend="splash")
    with pytest.raises(ValueError, match="log-sum-exp"):
        attn.attention(q, k, v, backend="jax", return_lse=True)


def test_mmdit_forward_on_blocked_backend(small_block):
    config = dataclasses.replace(get_preset("tiny-sd3.5-medium"), num_layers=2)
    params = init_mmdit(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    args = (params, jnp.asarray(rng.standard_normal((2, config.in_channels, 12, 8)), jnp.float32),
            jnp.asarray([999.0, 250.0]), jnp.asarray(rng.standard_normal((2, 6, config.joint_attention_dim)),
                                                      jnp.float32),
            jnp.asarray(rng.standard_normal((2, config.pooled_projection_dim)), jnp.float32), skip_mask(config, None))
    want = jax.jit(make_forward(config))(*args)
    got = jax.jit(make_forward(config, RunOptions(backend="blocked")))(*args)
    assert rel_err(got, want) <= 1e-6


def test_blocked_backend_matches_diffusers(small_block):
    """The MMDiT on the blocked backend against diffusers itself (DESIGN section 7: rel err <= 1e-5)."""
    from customshift_jax.crosscheck.mmdit import ForwardInputs, random_diffusers_transformer, torch_forward
    from customshift_jax.models.mmdit.mapping import params_from_state_dict

    config = get_preset("tiny-sd3.5-medium")
    model = random_diffusers_transformer(config, seed=3)
    params = params_from_state_dict(config, model.state_dict())
    inputs = ForwardInputs.random(config, batch=2, height=12, width=8, seed=1)  # 24 image + 7 text: 4 blocks
    expected, _ = torch_forward(model, inputs)
    got = jax.jit(make_forward(config, RunOptions(backend="blocked")))(
        params, inputs.hidden_states, inputs.timestep, inputs.encoder_hidden_states, inputs.pooled_projections,
        skip_mask(config, None))
    assert rel_err(got, expected) <= 1e-5
