"""`lora_product`, a LoRA's term with a hand-written backward: its value and its three gradients equal autodiff's
of the plain expression scale * (x A) B, batched, in fp32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from customshift_jax.models.mmdit.lora import lora_product


@pytest.mark.parametrize("shape", [(2, 7, 5), (11, 5)])
def test_lora_product_gradients_equal_autodiff(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*shape[:-1], 4)), jnp.float32)  # a cotangent that is not all ones

    def ours(x, a, b):
        return jnp.sum(w * lora_product(x, a, b, 0.5))

    def plain(x, a, b):
        return jnp.sum(w * (0.5 * jnp.dot(jnp.dot(x, a), b)))

    assert rel_err(lora_product(x, a, b, 0.5), 0.5 * jnp.dot(jnp.dot(x, a), b)) == 0.0
    got, want = jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)
    for g, v in zip(got, want):
        assert g.shape == v.shape and g.dtype == v.dtype
        assert rel_err(g, v) < 1e-6
