"""The shift probe on the shipped world: beta is the CGB's, one per layer and head, and alpha (the reference's
attention mass) lies in (0, 1) and grows with gamma, as lambda = beta + log(gamma) says (DESIGN section 4)."""
from __future__ import annotations

import numpy as np
import pytest

from customshift_jax.toyworld import evaluate as E
from customshift_jax.toyworld.methods import WEIGHTS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model").is_dir(), reason="no shipped world weights")


@pytest.fixture(scope="module")
def world_model():
    from customshift_jax.toyworld.methods import WorldModel

    return WorldModel.load(WEIGHTS)


def test_beta_table_is_the_cgbs_beta(world_model):
    from customshift_jax.toyworld.shift_probe import beta_table

    beta = beta_table(world_model)
    assert beta.shape == (world_model.config.num_layers, world_model.config.num_attention_heads)
    assert np.all(np.isfinite(beta)) and np.any(beta != 0)  # trained, not the zero init
    assert np.all(beta_table(world_model, "concat") == 0)  # concat ignores beta: it keeps its zero init


def test_alpha_lies_in_0_1_and_grows_with_gamma(world_model):
    from customshift_jax.toyworld.shift_probe import alpha_per_layer

    cases = E.draw_cases(3, 2, 1)
    low, high = (alpha_per_layer(world_model, "customshift", cases, [0.5], gamma=g) for g in (0.5, 4.0))
    assert low.shape == (1, world_model.config.num_layers, world_model.config.num_attention_heads)
    assert np.all((low > 0) & (low < 1)) and np.all(high > low)
