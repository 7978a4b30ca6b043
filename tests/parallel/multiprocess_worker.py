"""One process of the two-process CPU job of tests/parallel/test_multiprocess.py (also runnable by hand).

    python tests/parallel/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I --out DIR

Each process has 4 CPU devices (set XLA_FLAGS before starting it); together they form one 8-device mesh
(fsdp=4 x tensor=2, rules "fsdp_tp") and each loads only its rows of every batch. The job runs the sharded
forward, saves the sharded params with orbax into DIR/ckpt, restores them and runs again; then one sharded
LoRA training step (AdamW), saves the resulting train state (LoRAs, optimizer state, step) into
DIR/train_state and restores it. Process 0 writes DIR/result.npz: the outputs, the params, the step's
metrics and the train state before and after the save / restore, all gathered whole.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def config():
    from customshift_jax.models.mmdit.config import MMDiTConfig

    return MMDiTConfig(num_layers=2, qk_norm="rms_norm", sample_size=8, attention_head_dim=8, num_attention_heads=4,
                       caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=24,
                       pos_embed_max_size=16)


MESH = dict(fsdp=4, tensor=2)
RULES = "fsdp_tp"
BATCH = 8
LORA_RANK, LORA_ALPHA = 4, 8.0
STEP_KW = dict(seed=3, text_dropout=0.25, ref_dropout=0.0)  # some samples drop the prompt


def inputs(cfg):
    """The global batch (every process can make it; each uses only its rows)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((BATCH, 16, 8, 8)).astype(np.float32),
            np.linspace(0, 950, BATCH).astype(np.float32),
            rng.standard_normal((BATCH, 8, cfg.joint_attention_dim)).astype(np.float32),
            rng.standard_normal((BATCH, cfg.pooled_projection_dim)).astype(np.float32))


def train_batch(cfg):
    """The global training batch, keys as `train.step.BATCH_KEYS` (each process uses only its rows)."""
    import numpy as np

    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal((BATCH, *s)).astype(np.float32)  # noqa: E731
    text, pooled = (8, cfg.joint_attention_dim), (cfg.pooled_projection_dim,)
    return {"latents": f(16, 8, 8), "ref_latents": f(16, 8, 8), "prompt_embeds": f(*text), "pooled": f(*pooled),
            "subject_embeds": f(*text), "subject_pooled": f(*pooled)}


def init_params(cfg):
    import jax

    from customshift_jax.models.mmdit.api import init_mmdit

    return jax.jit(lambda k: init_mmdit(cfg, k))(jax.random.key(0))


def lora():
    from customshift_jax.models.mmdit.lora import LoRAConfig

    return LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA)


def optimizer():
    """(AdamW, schedule): a constant lr, so the one step moves every LoRA leaf."""
    from customshift_jax.train.optim import make_optimizer

    return make_optimizer(1e-3)


def init_state(cfg, opt):
    """A train state whose every LoRA leaf (B and beta too) is non-zero, so every gradient flows."""
    import jax

    from customshift_jax.train.step import init_train_state

    state = init_train_state(cfg, lora(), opt, 0)
    leaves, tree = jax.tree_util.tree_flatten(state.trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = tree.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return state.replace(trainable=trainable, opt_state=opt.init(trainable))


def train_step(cfg, mesh, opt, schedule):
    """The sharded LoRA training step on `mesh`."""
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.parallel import sharding as sh
    from customshift_jax.train.step import TRAIN_STEP_AXES, make_train_step

    step = make_train_step(cfg, lora(), opt, sh.on_mesh(RunOptions(), mesh, RULES), schedule=schedule, **STEP_KW)
    return sh.ShardedFunction(step, mesh, RULES, *TRAIN_STEP_AXES)


def flatten(tree, prefix: str) -> dict:
    """`{prefix/path: leaf}` for every leaf of `tree` (the npz keys)."""
    import jax

    return {f"{prefix}/{jax.tree_util.keystr(k, simple=True, separator='/')}": v
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def local_rows(tree, rows, mesh, logical):
    """Global arrays, laid out by RULES, from this process's rows of each leaf of a host `tree`."""
    import jax

    from customshift_jax.parallel import distributed

    return jax.tree_util.tree_map(
        lambda x, ax: distributed.global_batch_array(x[rows], mesh, RULES, ax(x.shape), x.shape), tree, logical)


def same_layout(a, b) -> bool:
    """Whether two trees of arrays have equal shardings leaf by leaf."""
    import jax

    return all(x.sharding == y.sharding for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def run_forward(cfg, mesh, params, rows, out, log) -> dict:
    """The sharded forward, an orbax save / restore of the params, the forward again: gathered results."""
    import numpy as np

    from customshift_jax.models.mmdit.api import make_forward
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.parallel import distributed
    from customshift_jax.parallel import sharding as sh
    from customshift_jax.parallel.sharding import BATCH_AXES, LATENT_AXES, TOKEN_AXES

    sharded_inputs = local_rows(inputs(cfg), rows, mesh, (LATENT_AXES, BATCH_AXES, TOKEN_AXES, BATCH_AXES))
    skip = np.zeros((cfg.num_layers,), bool)
    forward = sh.ShardedFunction(make_forward(cfg, sh.on_mesh(RunOptions(), mesh, RULES)), mesh, RULES,
                                 *sh.FORWARD_AXES)
    y = forward(params, *sharded_inputs, skip)
    log(f"forward done, output sharding {y.sharding.spec}")
    path = distributed.save_sharded(out / "ckpt", params)
    restored = distributed.restore_sharded(path, sh.abstract_params(params, mesh, RULES))
    log("params saved and restored")
    y_restored = forward(restored, *sharded_inputs, skip)
    y, y_restored, restored_np = distributed.gather((y, y_restored, restored))
    return {"out": y, "out_restored": y_restored, "same_layout": np.asarray(same_layout(restored, params)),
            **flatten(restored_np, "param")}


def run_train(cfg, mesh, params, rows, out, log) -> dict:
    """One sharded training step, an orbax save / restore of the train state: gathered results."""
    import jax
    import numpy as np

    from customshift_jax.parallel import distributed
    from customshift_jax.parallel import sharding as sh

    opt, schedule = optimizer()
    step = train_step(cfg, mesh, opt, schedule)
    batch = local_rows(train_batch(cfg), rows, mesh, {k: sh.BATCH_AXES for k in train_batch(cfg)})
    state, metrics = step(init_state(cfg, opt), params, batch)
    jax.block_until_ready(state)
    log(f"train step done, loss {float(distributed.gather(metrics['loss'])):.6f}")
    path = distributed.save_sharded(out / "train_state", state)
    restored = distributed.restore_sharded(path, sh.abstract_params(state, mesh, RULES))
    log("train state saved and restored")
    tree = jax.tree_util.tree_structure
    layout = same_layout(restored, state) and tree(restored) == tree(state)
    state_np, restored_np, metrics_np = distributed.gather((state, restored, metrics))
    return {"train_same_layout": np.asarray(layout), **flatten(metrics_np, "metric"),
            **flatten(state_np, "state"), **flatten(restored_np, "restored")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()

    from customshift_jax.parallel import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax.parallel import sharding as sh

    log = lambda msg: print(f"[process {jax.process_index()} {time.time() - start:5.1f}s] {msg}", flush=True)  # noqa
    log(f"{jax.process_count()} processes, {jax.local_device_count()} local of {jax.device_count()} devices")
    cfg, out = config(), Path(args.out)
    mesh = sh.make_mesh(**MESH)
    params = sh.shard_params(init_params(cfg), mesh, RULES)
    # Each process holds only its rows of every batch; the global arrays are assembled from them.
    rows = distributed.process_slice(BATCH, sh.logical_sharding(("batch",), (BATCH,), mesh, RULES))
    log(f"rows {rows.start}:{rows.stop} of the batch")
    result = run_forward(cfg, mesh, params, rows, out, log)
    result.update(run_train(cfg, mesh, params, rows, out, log))
    if jax.process_index() == 0:
        np.savez(out / "result.npz", **result)
    log("done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
