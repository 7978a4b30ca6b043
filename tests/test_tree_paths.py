"""Leaves by name: key paths as strings, and how one tree's names and shapes differ from another's."""
import jax.numpy as jnp
import numpy as np

from customshift_jax.tree_paths import key_names, named_leaves, shape_mismatches


def test_named_leaves_read_dict_keys_and_sequence_indices():
    tree = {"blocks": [{"kernel": np.zeros((2, 3))}, {"kernel": np.zeros(4)}], "bias": np.zeros(1)}
    assert [names for names, _ in named_leaves(tree)] == [("bias",), ("blocks", "0", "kernel"),
                                                           ("blocks", "1", "kernel")]
    assert key_names(()) == ()


def test_shape_mismatches_name_missing_unexpected_and_misshapen_leaves():
    expected = {"a": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, "b": jnp.zeros(5)}
    got = {"a": {"kernel": np.zeros((3, 2)), "bias": np.zeros(3)}, "c": np.zeros(5)}
    assert shape_mismatches(expected, expected) == []
    assert shape_mismatches(expected, got) == ["missing b", "unexpected c", "a/kernel has shape (3, 2), expected (2, 3)"]
    assert len(shape_mismatches({str(i): np.zeros(1) for i in range(9)}, {}, limit=4)) == 4
