"""The Pallas flash kernels (interpret mode on CPU) equal the xla backend: output, LSE and gradients (rel err
<= 1e-5 fp32) for joint attention, the shift in both forms, per-sample gamma, gamma = 0 (exactly the base),
concat, and lengths that are not block multiples (blocks of 16 so that 37 / 21 tokens split raggedly)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from customshift_jax.customshift.branches import customshift_apply, init_lora, prefill
from customshift_jax.customshift.cads import cads_attention, shift_logit, single_form_bias
from customshift_jax.kernels import BlockSizes, blocks, flash_attention, shifted_flash_attention
from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.attention import attention
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.lora import LoRAConfig

B, N_IMG, N_TXT, R, H, D = 2, 24, 13, 21, 2, 8
NQ = N_IMG + N_TXT  # 37 queries = keys: 3 blocks of 16, the last one ragged; 21 reference keys: 2 blocks
TOL = 1e-5


@pytest.fixture(autouse=True)
def blocks_of_16(monkeypatch):
    monkeypatch.setattr(blocks, "MAX_BLOCK", 16)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, NQ, H, D)), jnp.float32) for _ in range(3))
    k_ref, v_ref = (jnp.asarray(rng.standard_normal((1, R, H, D)), jnp.float32) for _ in range(2))
    return q, k, v, k_ref, v_ref


def _outputs_and_grads(fn, n_args: int):
    """jit of args -> (fn's outputs, gradients of every argument of a loss that reads every output entry
    non-linearly), in one compile (the forward is traced once)."""
    def loss(*args):
        out = fn(*args)
        return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree_util.tree_leaves(out)), out

    return jax.jit(jax.grad(loss, argnums=tuple(range(n_args)), has_aux=True))


def _assert_close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape and rel_err(a, b) <= TOL, (a.shape, rel_err(a, b))


def _xla_single(q, k, v, k_ref, v_ref, lam):
    """Form (b) on the xla backend with its dense bias: (out, lse), the reference of the fused kernel."""
    k_ref, v_ref = (jnp.broadcast_to(x, (B,) + x.shape[1:]) for x in (k_ref, v_ref))
    bias = single_form_bias(lam, N_IMG, NQ, NQ, R)
    return attention(q, jnp.concatenate([k, k_ref], 1), jnp.concatenate([v, v_ref], 1), bias=bias, return_lse=True)


def _fused(q, k, v, k_ref, v_ref, lam):
    return shifted_flash_attention(q, k, v, k_ref, v_ref, lam, N_IMG)


def test_joint_attention_output_lse_and_gradients():
    run = {b: _outputs_and_grads(lambda *a, b=b: attention(*a, backend=b, return_lse=True), 3)
           for b in ("flash", "xla")}
    q, k, v, _, _ = _arrays()
    _assert_close(run["flash"](q, k, v), run["xla"](q, k, v))


_FUSED = _outputs_and_grads(_fused, 6)
_XLA_SINGLE = _outputs_and_grads(_xla_single, 6)


@pytest.mark.parametrize("case", ["gamma", "per_sample_gamma", "concat"])
def test_fused_shift_output_lse_and_gradients(case):
    """Form (b) fused: out, LSE and the gradients of q, k, v, the reference K/V and lambda (beta is learned)."""
    beta = jnp.asarray([0.4, -0.3], jnp.float32)
    gamma = {"gamma": 0.7, "per_sample_gamma": jnp.asarray([0.5, 2.0]), "concat": 1.0}[case]
    lam = shift_logit(beta, gamma, "concat" if case == "concat" else "cads")
    args = (*_arrays(), lam)
    _assert_close(_FUSED(*args), _XLA_SINGLE(*args))


def test_two_pass_form_on_flash_differentiates_through_the_lse():
    """Form (a) on the flash backend: two kernels returning the LSE and the merge; its gradients need the LSE's."""
    run = {b: _outputs_and_grads(lambda *a, b=b: cads_attention(*a, N_IMG, form="two_pass", backend=b), 6)
           for b in ("flash", "xla")}
    args = (*_arrays(1), shift_logit(jnp.asarray([0.4, -0.3]), jnp.asarray([0.5, 2.0])))
    _assert_close(run["flash"](*args), run["xla"](*args))


def test_gamma_zero_is_exactly_the_base_attention():
    q, k, v, k_ref, v_ref = _arrays(2)
    base_out, base_lse = jax.jit(flash_attention)(q, k, v)
    lam = shift_logit(jnp.asarray([0.4, -0.3]), jnp.asarray([0.0, 1.0]))  # sample 0 drops the reference
    out, lse = jax.jit(_fused)(q, k, v, k_ref, v_ref, lam)
    np.testing.assert_array_equal(out[0], base_out[0])
    np.testing.assert_array_equal(lse[0], base_lse[0])
    np.testing.assert_array_equal(out[1, N_IMG:], base_out[1, N_IMG:])  # text queries never read the reference
    assert rel_err(out[1, :N_IMG], base_out[1, :N_IMG]) > 1e-2  # the kept sample's image queries do


def test_single_form_on_flash_is_the_fused_kernel():
    lam = shift_logit(jnp.asarray([0.4, -0.3]), 0.7)
    args = _arrays(3)
    got = jax.jit(lambda *a: cads_attention(*a, lam, N_IMG, form="single", backend="flash"))(*args)
    np.testing.assert_array_equal(got, jax.jit(_fused)(*args, lam)[0])
    _assert_close(got, cads_attention(*args, lam, N_IMG, form="single"))


def test_block_sizes_follow_the_shape_and_can_be_given(monkeypatch):
    assert blocks.choose_block_sizes(37, 21, 8, "cpu") == (16, 16)  # the fixture's cap of 16
    monkeypatch.setattr(blocks, "MAX_BLOCK", 128)
    assert blocks.choose_block_sizes(4429, 4429, 64, "gpu") == (128, 128)
    assert blocks.choose_block_sizes(4429, 4429, 128, "gpu") == (128, 64)
    assert blocks.choose_block_sizes(20, 40, 64, "cpu") == (32, 64)
    assert blocks.choose_block_sizes(20, 40, 64, "tpu") == (128, 128)
    assert blocks.choose_block_sizes(20, 40, 64, "gpu", BlockSizes(block_k=32)) == (32, 32)
    q, k, v, _, _ = _arrays()
    out, lse = flash_attention(q, k, v, block_sizes=BlockSizes(8, 32))
    _assert_close((out, lse), attention(q, k, v, return_lse=True))


@pytest.mark.parametrize("platform, lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_fused_kernel_lowers_for_triton_and_mosaic(monkeypatch, platform, lowering):
    """Forward and backward of the fused kernel lower (Pallas -> Triton / Mosaic) on this CPU host, without a
    device (the device's compiler still runs after this, on the device)."""
    monkeypatch.setattr(blocks, "MAX_BLOCK", 128)
    shape = lambda n: jax.ShapeDtypeStruct((1, n, H, 64), jnp.bfloat16)
    args = (shape(300), shape(300), shape(300), shape(200), shape(200), jax.ShapeDtypeStruct((H,), jnp.float32))

    def step(*a):
        out, lse = shifted_flash_attention(*a, 250, platform=platform)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(lse)

    text = jax.jit(jax.grad(step, argnums=range(6))).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    assert text.count("custom_call") >= 3  # forward, dq, dk/dv (base and reference)


def test_unsupported_platforms_shapes_and_a_dense_bias_are_refused():
    q, k, v, k_ref, v_ref = _arrays()
    with pytest.raises(ValueError, match="no dense bias"):
        attention(q, k, v, bias=jnp.zeros((NQ,)), backend="flash")
    with pytest.raises(ValueError, match="no compiled CPU lowering"):
        flash_attention(q, k, v, interpret=False)
    with pytest.raises(ValueError, match="not on 'metal'"):
        blocks.resolve_interpret(None, "metal")
    with pytest.raises(ValueError, match="power of two in"):
        blocks.check_supported("gpu", False, 80, 64, 64)
    with pytest.raises(ValueError, match="multiples of 128"):
        blocks.check_supported("tpu", False, 64, 64, 128)
    with pytest.raises(ValueError, match="same B, H, D"):
        flash_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match=r"lambda must be \(H,\) or \(B, H\)"):
        shifted_flash_attention(q, k, v, k_ref, v_ref, jnp.zeros((3,)), N_IMG)
    with pytest.raises(ValueError, match="positive int"):
        flash_attention(q, k, v, block_sizes=BlockSizes(block_q=0))


def test_customshift_forward_on_flash_equals_xla():
    """The whole tiny CustomShift (CGB) forward, the fused shift in every layer, on "flash" vs "xla"."""
    config = get_preset("tiny-sd3-medium")
    lora = LoRAConfig(rank=4, alpha=8.0)
    params = jax.jit(lambda key: init_mmdit(config, key))(jax.random.key(0))  # eager init is slower
    cgb = init_lora(config, lora, jax.random.key(3), branch="cgb")
    cgb = jax.tree_util.tree_map(lambda x: x + 0.05, cgb)  # non-zero LoRA factors and beta
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((1, 16, 8, 8)).astype(np.float32),
           rng.standard_normal((1, 5, config.joint_attention_dim)).astype(np.float32),
           rng.standard_normal((1, config.pooled_projection_dim)).astype(np.float32))
    inputs = (rng.standard_normal((2, 16, 8, 6)).astype(np.float32), np.array([100.0, 700.0], np.float32),
              rng.standard_normal((2, 7, config.joint_attention_dim)).astype(np.float32),
              rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32))
    cache = prefill(config, params, *ref, lora_config=lora)  # the RAB's plain attention: covered above
    runs = [customshift_apply(config, params, *inputs, cache, cgb_lora=cgb, lora_config=lora, gamma=0.7, form="single",
                              backend=backend) for backend in ("flash", "xla")]
    _assert_close(*runs)
