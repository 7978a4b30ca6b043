"""The pure train step: dropouts are per sample, reference dropout keeps gradients finite (and gives the RAB
none), the sharded step (data-parallel mesh) matches the plain one, and a non-finite loss stops
`customshift train` naming the step."""
from __future__ import annotations

import dataclasses
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset

from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.train.optim import make_optimizer
from customshift_jax.train.step import init_train_state, make_loss_fn, make_train_step

CONFIG = dataclasses.replace(get_preset("tiny-sd3-medium"), num_layers=1)
LORA = LoRAConfig(rank=2, alpha=2.0)


def _batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"latents": f(b, 16, 8, 8), "ref_latents": f(b, 16, 8, 8), "prompt_embeds": f(b, 6, 32),
            "pooled": f(b, 24), "subject_embeds": f(b, 6, 32), "subject_pooled": f(b, 24)}


def _nonzero_lora(opt):
    state = init_train_state(CONFIG, LORA, opt, 0)
    # B = 0 at init gives the A matrices no gradient; make every leaf non-zero so all gradients flow.
    leaves, tree = jax.tree_util.tree_flatten(state.trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = jax.tree_util.tree_unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return state.replace(trainable=trainable, opt_state=opt.init(trainable))


def test_reference_dropout_gradients_finite():
    base = init_mmdit(CONFIG, jax.random.key(0))
    opt, _ = make_optimizer(1e-3)
    state = _nonzero_lora(opt)
    loss_fn = jax.jit(jax.grad(make_loss_fn(CONFIG, LORA, ref_dropout=1.0, text_dropout=1.0), has_aux=True))
    grads, aux = loss_fn(state.trainable, base, _batch(), jax.random.key(0))
    assert float(aux["ref_dropped"]) == 1.0 and float(aux["text_dropped"]) == 1.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads["rab"]))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["cgb"])) > 0


def test_dropout_is_decided_per_sample():
    base = init_mmdit(CONFIG, jax.random.key(0))
    opt, _ = make_optimizer(1e-3)
    state = _nonzero_lora(opt)
    loss_fn = jax.jit(make_loss_fn(CONFIG, LORA, ref_dropout=0.5, text_dropout=0.5))
    aux = [loss_fn(state.trainable, base, _batch(b=4), jax.random.key(k))[1] for k in range(6)]
    assert {float(a["ref_dropped"]) for a in aux} - {0.0, 1.0}  # some batches drop some of their references
    assert {float(a["text_dropped"]) for a in aux} - {0.0, 1.0}


def test_sharded_step_matches_plain():
    from jax.sharding import NamedSharding, PartitionSpec

    from customshift_jax.parallel import sharding as shd

    base = init_mmdit(CONFIG, jax.random.key(0))
    opt, sched = make_optimizer(1e-3)
    state = _nonzero_lora(opt)
    batch = _batch()
    plain = jax.jit(make_train_step(CONFIG, LORA, opt, seed=0, schedule=sched))
    s1, m1 = plain(state, base, batch)
    mesh = shd.make_mesh(data=2, devices=jax.devices()[:2])
    rep = NamedSharding(mesh, PartitionSpec())
    state_sh = jax.tree_util.tree_map(lambda _: rep, state)
    base_sh = shd.param_shardings(base, mesh, "dp")
    batch_sh = {k: shd.logical_sharding(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh, "dp")
                for k, v in batch.items()}
    fn = make_train_step(CONFIG, LORA, opt, RunOptions(activation_sharding=shd.activation_hook(mesh, "dp")), seed=0,
                         schedule=sched)
    with jax.set_mesh(mesh):
        sharded = jax.jit(fn, in_shardings=(state_sh, base_sh, batch_sh), out_shardings=(state_sh, rep))
        s2, m2 = sharded(state, base, batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1.trainable), jax.tree_util.tree_leaves(s2.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data")
    cmd = trainer_cmd(ROOT / "train" / "configs" / "tiny.yaml", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
                      "train.steps=30", "train.lr=1e30", "train.warmup_steps=0", "train.clip_norm=null",
                      "checkpoint.every=1")
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite loss" in r.stdout and "at step" in r.stdout and "last good checkpoint is step" in r.stdout


def test_beta_learns_at_its_own_rate():
    """`lr_scale_by_name={"beta": k}` multiplies beta's AdamW update by k and leaves every other leaf's as it was;
    on a CustomShift train state, the step's beta moves k times as far as without the scale."""
    grads = {"attn": {"beta": jnp.array([0.3, -2.0]), "to_q": {"lora_A": jnp.array([[1.0, -0.5]])}}}
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    plain, _ = make_optimizer(1e-2, weight_decay=0.0, clip_norm=None)
    scaled, _ = make_optimizer(1e-2, weight_decay=0.0, clip_norm=None, lr_scale_by_name={"beta": 10.0})
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u_scaled["attn"]["beta"], 10.0 * u_plain["attn"]["beta"], rtol=1e-6)
    np.testing.assert_array_equal(u_scaled["attn"]["to_q"]["lora_A"], u_plain["attn"]["to_q"]["lora_A"])
    assert float(jnp.abs(u_plain["attn"]["beta"]).min()) > 1e-3  # Adam's first step: about lr per leaf

    base = init_mmdit(CONFIG, jax.random.key(0))
    moved = {}
    for k in (1.0, 10.0):
        opt, _ = make_optimizer(1e-2, weight_decay=0.0, lr_scale_by_name={"beta": k})
        state = _nonzero_lora(opt)
        new = jax.jit(make_train_step(CONFIG, LORA, opt, seed=0))(state, base, _batch())[0]
        moved[k] = {jax.tree_util.keystr(path): np.asarray(a - b) for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(new.trainable), jax.tree_util.tree_leaves(state.trainable))}
    betas = [key for key in moved[1.0] if key.endswith("['beta']")]
    assert betas and len(betas) < len(moved[1.0])
    for key in moved[1.0]:
        expected = moved[1.0][key] * (10.0 if key in betas else 1.0)
        np.testing.assert_allclose(moved[10.0][key], expected, rtol=1e-5, atol=1e-9)
    assert min(float(np.abs(moved[1.0][key]).max()) for key in betas) > 1e-4
