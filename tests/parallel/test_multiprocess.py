"""Two processes on 127.0.0.1 (4 CPU devices each, gloo) form one 8-device job: the sharded forward, one
sharded LoRA training step and orbax saves / restores of the params and of the train state give what one
process with 8 devices computes (DESIGN section 5)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pytest

from customshift_jax.models.mmdit.api import make_forward
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.numerics import relative_error
from customshift_jax.parallel import sharding as sh

sys.path.insert(0, str(Path(__file__).parent))
import multiprocess_worker as worker  # noqa: E402

TIMEOUT_S = 420
WORKER = Path(__file__).parent / "multiprocess_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_argv(out_dir: Path) -> Callable[[int, int, int], list[str]]:
    """The command of worker i of n (coordinator on `port`): tests/parallel/multiprocess_worker.py writing to `out_dir`."""
    return lambda i, n, port: [sys.executable, str(WORKER), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(n), "--process-id", str(i), "--out", str(out_dir)]


def run_job(out_dir: Path, while_running: Callable[[], Any] = lambda: None, n: int = 2,
            argv: Callable[[int, int, int], list[str]] | None = None) -> tuple[list[str], float, Any]:
    """Start n processes (`argv(i, n, port)`, default the worker script; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID set for each), call `while_running` here, wait for all (bounded), kill every one still
    running on timeout or failure: (logs, seconds, what `while_running` returned)."""
    port = free_port()
    argv = argv or worker_argv(out_dir)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    logs = [open(out_dir / f"worker{i}.log", "w+") for i in range(n)]
    start = time.time()
    procs = [subprocess.Popen(argv(i, n, port), stdout=logs[i], stderr=subprocess.STDOUT,
                              env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                                       JAX_PROCESS_ID=str(i))) for i in range(n)]
    try:
        value = while_running()  # overlaps the workers' start-up and their collective waits
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
    return texts, time.time() - start, value


# The processes' gloo all-reduces sum the gradients in another order than one process does (grad norm ~1e-7
# apart). Held to TOL: what is well conditioned, the loss, the gradient norm and Adam's moments. The stepped
# LoRAs are printed, not held: Adam's first step, g / (|g| + eps), magnifies that round-off for the components
# with |g| near eps (7.7e-6 on one CPU, 2e-5 on another for the same kind of run).
TOL = 1e-5


def leaf_errors(result, prefix: str, expected) -> dict[str, float]:
    """Relative error of each stored leaf `prefix/...` against `expected`'s; an all-zero leaf must stay zero."""
    stored = {k for k in result.files if k.startswith(prefix + "/")}
    want = worker.flatten(jax.tree_util.tree_map(np.asarray, expected), prefix)
    assert stored == set(want), f"{prefix}: stored leaves differ from expected: {sorted(stored ^ set(want))}"
    return {k: relative_error(result[k], e) if np.any(e) else float(np.any(result[k])) for k, e in want.items()}


def expected_forward(cfg, mesh, params) -> np.ndarray:
    """The sharded forward on this process's 8 devices."""
    options = sh.on_mesh(RunOptions(), mesh, worker.RULES)
    forward = sh.ShardedFunction(make_forward(cfg, options), mesh, worker.RULES, *sh.FORWARD_AXES)
    return np.asarray(forward(params, *worker.inputs(cfg), np.zeros((cfg.num_layers,), bool)))


def expected_train_step(cfg, mesh, params) -> tuple[Any, dict]:
    """(state, metrics) of the same sharded training step on this process's 8 devices, as numpy."""
    opt, schedule = worker.optimizer()
    step = worker.train_step(cfg, mesh, opt, schedule)
    out = step(worker.init_state(cfg, opt), params, worker.train_batch(cfg))
    return jax.tree_util.tree_map(np.asarray, out)


def one_process() -> dict:
    """Everything the two-process job computes, computed here on one process with 8 devices."""
    cfg, mesh = worker.config(), sh.make_mesh(**worker.MESH)
    params = worker.init_params(cfg)
    sharded = sh.shard_params(params, mesh, worker.RULES)
    state, metrics = expected_train_step(cfg, mesh, sharded)
    return {"params": jax.tree_util.tree_map(np.asarray, params), "out": expected_forward(cfg, mesh, sharded),
            "state": state, "metrics": metrics}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the two-process job once, the one-process reference meanwhile: (result.npz, logs, reference)."""
    out = tmp_path_factory.mktemp("multiprocess")
    texts, seconds, reference = run_job(out, one_process)
    print(f"two-process job (and the one-process reference): {seconds:.1f} s")
    return np.load(out / "result.npz"), texts, reference


def test_two_processes_equal_one_process(job):
    result, texts, reference = job
    assert bool(result["same_layout"]), "restored params do not have the requested shardings"
    assert "rows 0:4" in texts[0] and "rows 4:8" in texts[1], "each process must load only its half of the batch"
    errors = leaf_errors(result, "param", reference["params"])
    assert max(errors.values()) == 0, f"restored params differ from the saved ones: {errors}"
    err = relative_error(result["out"], reference["out"])
    assert err <= 1e-6, f"two-process forward vs one process: rel err {err:.1e}"
    np.testing.assert_array_equal(result["out_restored"], result["out"], err_msg="forward of the restored params")


def test_two_process_train_step_equals_one_process(job):
    result, _, reference = job
    state, metrics = reference["state"], reference["metrics"]
    assert bool(result["train_same_layout"]), "restored train state does not have the step's shardings"
    for key in (k for k in result.files if k.startswith("restored/")):
        np.testing.assert_array_equal(result[key], result["state/" + key[len("restored/"):]],
                                      err_msg=f"{key}: restored train state differs from the saved one")
    errors = {"loss": relative_error(result["metric/loss"], metrics["loss"]),
              "grad_norm": relative_error(result["metric/grad_norm"], metrics["grad_norm"]),
              "trainable": max(leaf_errors(result, "restored/trainable", state.trainable).values()),
              "opt_state": max(leaf_errors(result, "restored/opt_state", state.opt_state).values())}
    print("two processes vs one:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert int(result["restored/step"]) == int(state.step) == 1, "the restored step counter"
    held = {k: v for k, v in errors.items() if k != "trainable"}
    assert all(e <= TOL for e in held.values()), f"two-process train step vs one process (tol {TOL}): {held}"
