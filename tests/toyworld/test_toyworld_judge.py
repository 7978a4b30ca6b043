"""The judge of the procedural world: the shipped weights read held-out subjects, files round-trip and fail
clearly, and the identity embedding prefers the same subject across contexts."""
import numpy as np
import pytest

from customshift_jax.toyworld import judge, world

# Floors with margin under the shipped judge's measured accuracy on these 256 clean held-out renders (seed
# 2024): silhouette 1.0, body 0.996, accent 0.996, pattern 0.984, scene 1.0, position 1.0, size 1.0; all
# subject factors right 0.977. Pattern stays the weakest (0.980 on 1000 renders).
MIN_ACCURACY = {"silhouette": 0.97, "body": 0.97, "accent": 0.97, "pattern": 0.95,
                "scene": 0.98, "position": 0.98, "size": 0.98, "subject_all": 0.94}


@pytest.fixture(scope="module")
def shipped():
    """(config, params) of the judge that ships in the package."""
    return judge.load_judge(judge.DEFAULT_WEIGHTS)


def test_shipped_judge_reads_heldout_subjects(shipped):
    images, subjects, contexts = judge.heldout_set(256, seed=2024)
    scores = judge.score(judge.judge_images(*shipped, images), subjects, contexts)
    for name, floor in MIN_ACCURACY.items():
        assert scores[name] >= floor, (name, scores)


def test_identity_embedding_prefers_the_same_subject(shipped):
    """Same subject in two different contexts vs different subjects: mean cosine is clearly higher."""
    _, held = world.split_subjects(0)
    rng = np.random.default_rng(3)
    subjects = [held[i] for i in rng.choice(len(held), 128, replace=False)]
    ctx_a = [world.random_context(rng) for _ in subjects]
    ctx_b = [world.Context((c.scene + 3) % 8, (c.position + 1) % 3, 1 - c.size) for c in ctx_a]  # all differ
    images = world.render_batch(list(zip(subjects, ctx_a)) + list(zip(subjects, ctx_b)), seed=5)
    emb = judge.judge_images(*shipped, images)["embedding"]  # (256, E)
    assert emb.shape == (256, shipped[0].embed_dim)
    a, b = emb[:128], emb[128:]
    same = judge.identity_cosine(a, b)
    other = judge.identity_cosine(a, np.roll(b, 1, axis=0))  # a different held-out subject
    assert same.mean() > other.mean() + 0.5, (same.mean(), other.mean())  # measured 0.94 vs 0.04


def test_save_load_round_trip(tmp_path, shipped):
    config, params = shipped
    path = judge.save_judge(tmp_path / "j.npz", config, params)
    config2, params2 = judge.load_judge(path)
    assert config2 == config
    flat, flat2 = (dict(judge.traverse_util.flatten_dict(p, sep="/")) for p in (params, params2))
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat2[k]), err_msg=k)
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place


def test_damaged_or_missing_judge_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no judge file there; train one"):
        judge.load_judge(tmp_path / "absent.npz")
    good = judge.DEFAULT_WEIGHTS.read_bytes()
    for name, data in [("truncated.npz", good[: len(good) // 2]), ("garbage.npz", b"not a judge" * 10)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable judge file") as err:
            judge.load_judge(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_judge_images_rejects_float_images(shipped):
    with pytest.raises(ValueError, match="expects uint8 images"):
        judge.judge_images(*shipped, np.zeros((2, 32, 32, 3), np.float32))
