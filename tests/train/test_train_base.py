"""`customshift train` with train.mode=base: the whole MMDiT trains (with an EMA) through the real CLI, is
exported as our checkpoint OUTPUT_DIR/model (the init checkpoint's VAE copied) that load_transformer and
load_vae read, resumes bit for bit (with base-mode samples on the way), the EMA follows its formula (only on
the micro-steps that apply an update), the sharded base step equals the plain one, and a bad train.mode is a
one-line error."""
from __future__ import annotations

import subprocess

import jax
import numpy as np
import pytest
from train_fixtures import ROOT, trainer_cmd, trainer_env, write_synthetic_dataset

from customshift_jax.io.checkpoint import save_checkpoint
from customshift_jax.io.loading import load_transformer, load_vae
from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.models.vae import init_vae
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.numerics import relative_error
from customshift_jax.parallel import sharding as sh
from customshift_jax.train.base_step import init_base_train_state, make_base_train_step
from customshift_jax.train.loop import final_trainable, load_base
from customshift_jax.train.optim import make_optimizer
from customshift_jax.train.step import TRAIN_STEP_AXES

CONFIG_YAML = ROOT / "train" / "configs" / "tiny.yaml"
TINY = {"checkpoint": None, "preset": "tiny-sd3-medium", "num_layers": 2, "init_seed": 0, "base_dtype": "fp32"}
BASE = ("train.mode=base", "train.ema_decay=0.9", "checkpoint.every=2", "log.tensorboard=false")


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _run(tmp, run: str, steps: int, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    cmd = trainer_cmd(CONFIG_YAML, f"data.path={tmp / 'data'}", f"model.checkpoint={tmp / 'init'}",
                      "model.preset=null", f"output_dir={tmp / run}", f"train.steps={steps}", *BASE, *extra,
                      resume=resume)
    r = subprocess.run(cmd, cwd=ROOT, env=trainer_env(tmp / "cache"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The init checkpoint (tiny transformer + tiny VAE), a straight 4-step base run, and 2 steps + resume to 4."""
    tmp = tmp_path_factory.mktemp("base")
    write_synthetic_dataset(tmp / "data")
    config, params = load_base(TINY)
    vae_config = VAEConfig.tiny()
    vae = init_vae(vae_config, jax.random.key(1))
    save_checkpoint(tmp / "init", {"transformer": (config, params), "vae": (vae_config, vae)})
    straight = _run(tmp, "straight", 4)
    _run(tmp, "resumed", 2)
    resumed = _run(tmp, "resumed", 4, "sample.every=4", "sample.steps=2", resume=True)
    return dict(tmp=tmp, config=config, init=params, vae=vae, straight=straight, resumed=resumed)


def test_base_run_exports_a_trained_checkpoint(runs):
    tmp = runs["tmp"]
    assert "wrote the trained transformer (EMA weights)" in runs["straight"].stdout
    config, exported = load_transformer(tmp / "straight" / "model")
    assert config == runs["config"]
    init, ema = _leaves(runs["init"]), _leaves(exported)
    assert len(init) == len(ema)
    changed = sum(not np.array_equal(a, b) for a, b in zip(init, ema))
    assert changed > len(init) / 2, f"only {changed} of {len(init)} params moved"
    # The checkpoint's state by parameter path: the raw params (trainable/) and the EMA (ema/, the exported weights).
    state = final_trainable(tmp / "straight")
    raw = [v for k, v in state.items() if k.startswith("state/trainable/")]
    saved_ema = [v for k, v in state.items() if k.startswith("state/ema/")]
    assert len(raw) == len(saved_ema) == len(init)
    for a, b in zip(saved_ema, ema):
        np.testing.assert_array_equal(a, b)
    assert sum(not np.array_equal(a, b) for a, b in zip(raw, ema)) > len(init) / 2, "the EMA equals the params"
    # The init checkpoint's VAE came across unchanged.
    _, vae = load_vae(tmp / "straight" / "model")
    for a, b in zip(_leaves(vae), _leaves(runs["vae"])):
        np.testing.assert_array_equal(a, b)


def test_base_resume_is_exact(runs):
    tmp = runs["tmp"]
    assert "resumed from step 2" in runs["resumed"].stdout
    a, b = final_trainable(tmp / "straight"), final_trainable(tmp / "resumed")
    assert int(a["step"]) == int(b["step"]) == 4 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"leaf {k} differs after resume")
    # The resumed run replaced the model its first part exported, and sampled with the plain sampler.
    for x, y in zip(_leaves(load_transformer(tmp / "straight" / "model")[1]),
                    _leaves(load_transformer(tmp / "resumed" / "model")[1])):
        np.testing.assert_array_equal(x, y)
    assert (tmp / "resumed" / "samples" / "step-000004" / "00.png").is_file()
    assert not list((tmp / "resumed").glob(".model.*")), "the export left a temporary folder"


def test_bad_train_mode_is_a_one_line_error(tmp_path):
    r = subprocess.run(trainer_cmd(CONFIG_YAML, f"data.path={tmp_path}", f"output_dir={tmp_path / 'out'}",
                                   "train.mode=full"),
                       cwd=ROOT, env=trainer_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.mode" in lines[0] and "customshift, base" in lines[0], r.stderr


# 4 heads x 8 = width 32 divides every axis of the data=2 x fsdp=2 x tensor=2 mesh; batch 4 divides data x fsdp.
SMALL = MMDiTConfig(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm", sample_size=8, attention_head_dim=8,
                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                    pooled_projection_dim=24, pos_embed_max_size=16)


def _batch(seed: int, b: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"latents": f(b, 16, 8, 8), "prompt_embeds": f(b, 6, 32), "pooled": f(b, 24),
            "ref_latents": f(b, 16, 8, 8)}  # a reference key, which base mode ignores


def test_ema_follows_optimizer_updates_and_mesh_step_equals_plain():
    optimizer, schedule = make_optimizer(1e-3, accum_steps=2)  # no warm-up: update 1 moves
    params = jax.jit(lambda k: init_mmdit(SMALL, k))(jax.random.key(0))
    state0 = init_base_train_state(params, optimizer, ema_decay=0.5)
    kw = dict(seed=1, schedule=schedule, accum_steps=2, ema_decay=0.5, text_dropout=0.5)
    plain = jax.jit(make_base_train_step(SMALL, optimizer, **kw))
    s1, _ = plain(state0, {}, _batch(0))
    s2, m2 = plain(s1, {}, _batch(1))
    for e, p in zip(_leaves(s1.ema), _leaves(params)):  # micro-step 1 of 2: no update, the EMA stays
        np.testing.assert_array_equal(e, p)
    for e, p0, p in zip(_leaves(s2.ema), _leaves(params), _leaves(s2.trainable)):
        np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p, rtol=0, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(s2.trainable), _leaves(params)))

    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    fn = make_base_train_step(SMALL, optimizer, sh.on_mesh(RunOptions(), mesh, "fsdp_tp"), **kw)
    step = sh.ShardedFunction(fn, mesh, "fsdp_tp", *TRAIN_STEP_AXES)
    state = state0
    for seed in (0, 1):
        state, m = step(state, {}, _batch(seed))
    assert relative_error(m["loss"], m2["loss"]) <= 1e-5 and relative_error(m["grad_norm"], m2["grad_norm"]) <= 1e-5
    worst = max(relative_error(a, b) for a, b in zip(_leaves(state.opt_state), _leaves(s2.opt_state)) if np.any(b))
    assert worst <= 1e-5, worst
    # Not the weights: Adam's first update is lr * g / (|g| + eps), about +-lr whatever |g|, so an element whose
    # gradient is a few eps moves by a reduction-order-sensitive part of lr (up to its sign): ill-conditioned, CPU
    # dependent. The gradients are held above (Adam's moments), and the EMA formula on the plain run.
    kernel = state.trainable["transformer_blocks"]
    kernel = kernel[next(iter(kernel))]["scan"]["attn"]["to_q"]["kernel"]  # (layers, embed, heads): sharded
    assert kernel.addressable_shards[0].data.size < kernel.size, kernel.sharding
