"""Two processes on 127.0.0.1 (4 CPU devices each, gloo) form one 8-device job: the sharded forward and an
orbax save / restore give what one process with 8 devices computes (DESIGN section 5)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from customshift_jax import sharding as sh
from customshift_jax.numerics import relative_error

sys.path.insert(0, str(Path(__file__).parent))
import multiprocess_worker as worker  # noqa: E402

TIMEOUT_S = 240
WORKER = Path(__file__).parent / "multiprocess_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out_dir: Path, n: int = 2) -> tuple[list[str], float]:
    """Start n worker processes, wait for all (bounded), kill every one still running on timeout or failure."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    logs = [open(out_dir / f"worker{i}.log", "w+") for i in range(n)]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(n), "--process-id", str(i), "--out", str(out_dir)],
                              stdout=logs[i], stderr=subprocess.STDOUT, env=env) for i in range(n)]
    try:
        while any(p.poll() is None for p in procs):
            if time.time() - start > TIMEOUT_S:
                raise TimeoutError(f"the {n}-process job ran past {TIMEOUT_S} s")
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the others would wait on it forever
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        texts = []
        for f in logs:
            f.seek(0)
            texts.append(f.read())
            f.close()
    codes = [p.returncode for p in procs]
    assert codes == [0] * n, f"worker exit codes {codes}:\n" + "\n".join(t[-3000:] for t in texts)
    return texts, time.time() - start


def test_two_processes_equal_one_process(tmp_path):
    texts, seconds = run_job(tmp_path)
    print(f"two-process job: {seconds:.1f} s")
    result = np.load(tmp_path / "result.npz")
    assert bool(result["same_layout"]), "restored params do not have the requested shardings"
    assert "rows 0:4" in texts[0] and "rows 4:8" in texts[1]  # each process loaded only its half

    # The same step in this process, on 8 local devices.
    cfg = worker.config()
    mesh = sh.make_mesh(**worker.MESH)
    params = worker.init_params(cfg)
    forward = sh.make_sharded_forward(cfg, mesh, worker.RULES)
    expected = np.asarray(forward(sh.shard_params(params, mesh, worker.RULES), *worker.inputs(cfg),
                                  np.zeros((cfg.num_layers,), bool)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == len([k for k in result.files if k.startswith("param/")])
    for path, value in flat:
        key = "param/" + "/".join(str(p.key) for p in path)
        np.testing.assert_array_equal(result[key], np.asarray(value), err_msg=key)
    assert relative_error(result["out"], expected) <= 1e-6
    np.testing.assert_array_equal(result["out_restored"], result["out"])
