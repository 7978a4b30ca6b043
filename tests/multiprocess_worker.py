"""One process of the two-process CPU job of tests/test_multiprocess.py (also runnable by hand).

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I --out DIR

Each process has 4 CPU devices (set XLA_FLAGS before starting it); together they form one 8-device mesh
(fsdp=4 x tensor=2), load only their rows of the batch, run the sharded forward, save the sharded params
with orbax into DIR/ckpt, restore them, run again, and process 0 writes DIR/result.npz.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config():
    from customshift_jax.config import MMDiTConfig

    return MMDiTConfig(num_layers=2, qk_norm="rms_norm", sample_size=8, attention_head_dim=8, num_attention_heads=4,
                       caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=24,
                       pos_embed_max_size=16)


MESH = dict(fsdp=4, tensor=2)
RULES = "fsdp_tp"
BATCH = 8


def inputs(cfg):
    """The global batch (every process can make it; each uses only its rows)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((BATCH, 16, 8, 8)).astype(np.float32),
            np.linspace(0, 950, BATCH).astype(np.float32),
            rng.standard_normal((BATCH, 8, cfg.joint_attention_dim)).astype(np.float32),
            rng.standard_normal((BATCH, cfg.pooled_projection_dim)).astype(np.float32))


def init_params(cfg):
    import jax

    from customshift_jax.api import init_mmdit

    return jax.jit(lambda k: init_mmdit(cfg, k))(jax.random.key(0))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()

    from customshift_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from customshift_jax import sharding as sh
    from customshift_jax.sharding import LATENT_AXES, TOKEN_AXES

    log = lambda msg: print(f"[process {jax.process_index()} {time.time() - start:5.1f}s] {msg}", flush=True)  # noqa
    log(f"{jax.process_count()} processes, {jax.local_device_count()} local of {jax.device_count()} devices")
    cfg = config()
    mesh = sh.make_mesh(**MESH)
    params = sh.shard_params(init_params(cfg), mesh, RULES)

    # Each process holds only its rows of the batch; the global arrays are assembled from them.
    global_inputs = inputs(cfg)
    axes = (LATENT_AXES, lambda s: ("batch",), TOKEN_AXES, lambda s: ("batch", None))
    batch_sharding = sh.logical_sharding(("batch",), (BATCH,), mesh, RULES)
    rows = distributed.process_slice(BATCH, batch_sharding)
    log(f"rows {rows.start}:{rows.stop} of the batch")
    sharded_inputs = tuple(distributed.global_batch_array(x[rows], mesh, RULES, ax(x.shape), x.shape)
                           for x, ax in zip(global_inputs, axes))
    skip = np.zeros((cfg.num_layers,), bool)

    forward = sh.make_sharded_forward(cfg, mesh, RULES)
    out = forward(params, *sharded_inputs, skip)
    log(f"forward done, output sharding {out.sharding.spec}")

    path = Path(args.out) / "ckpt"
    distributed.save_sharded(path, params)
    log("saved")
    restored = distributed.restore_sharded(path, sh.abstract_params(params, mesh, RULES))
    log("restored")
    same_layout = all(r.sharding == p.sharding for r, p in zip(jax.tree_util.tree_leaves(restored),
                                                              jax.tree_util.tree_leaves(params)))
    out_restored = forward(restored, *sharded_inputs, skip)

    out_np, out_restored_np, restored_np = distributed.gather((out, out_restored, restored))
    if jax.process_index() == 0:
        flat = {"param/" + "/".join(str(p.key) for p in k): v
                for k, v in jax.tree_util.tree_flatten_with_path(restored_np)[0]}
        np.savez(Path(args.out) / "result.npz", out=out_np, out_restored=out_restored_np,
                 same_layout=np.asarray(same_layout), **flat)
    log("done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
