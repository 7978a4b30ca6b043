"""The VAE's fast forms equal the plain computations they replace: the upsampler's conv computed on the
low-resolution input (four 2x2 phase convs) and the mid block's attention over blocks of queries."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import rel_err

from customshift_jax.models.mmdit.attention import QUERY_BLOCK
from customshift_jax.models.vae.model import SpatialSelfAttention, UpsampledConv

TOL = 1e-6  # fp32, O(1) outputs of a few dozen terms each


def _nearest_x2(x):  # (B, H, W, C) -> (B, 2H, 2W, C)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def test_upsampled_conv_is_a_conv_of_the_nearest_upsampling():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 6)), jnp.float32)  # batch 2, non-square
    key = jax.random.key(1)
    params = UpsampledConv(4).init(key, x)
    plain = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))
    # the same param names, shapes and initial values as the nn.Conv it stands in for (a build from seeds is unchanged)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, plain.init(key, _nearest_x2(x))))
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # a non-zero bias too
    got = UpsampledConv(4).apply(params, x)
    want = plain.apply(params, _nearest_x2(x))
    assert got.shape == want.shape == (2, 10, 14, 4)
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    assert rel_err(got, plain.apply(jax.tree_util.tree_map(lambda a: a[::-1], params), _nearest_x2(x))) > 0.1


def test_mid_block_attention_over_query_blocks_equals_one_softmax():
    h, w, c = 20, 17, 8  # 340 tokens: more than one block, not a multiple of it
    assert h * w > QUERY_BLOCK and (h * w) % QUERY_BLOCK
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, h, w, c)), jnp.float32)
    module = SpatialSelfAttention(c, groups=4)
    params = module.init(jax.random.key(3), x)
    got = module.apply(params, x)

    p = params["params"]
    dense = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
    g = x.reshape(2, h, w, 4, c // 4)
    normed = ((g - g.mean((1, 2, 4), keepdims=True)) / jnp.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6))
    hs = normed.reshape(2, h * w, c) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
    q, k, v = (dense(n, hs) for n in ("to_q", "to_k", "to_v"))
    probs = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", probs, v) @ p["to_out"]["0"]["kernel"] + p["to_out"]["0"]["bias"]
    want = out.reshape(2, h, w, c) + x
    assert rel_err(got, want) <= TOL, rel_err(got, want)
