"""Run an n-process JAX job on 127.0.0.1 from a test (each process its own Python, gloo collectives): the
harness the multi-process tests share (tests/parallel/test_multiprocess.py, tests/train/test_prepare_multiprocess.py)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

TIMEOUT_S = 420
WORKER = Path(__file__).resolve().parent / "parallel" / "multiprocess_worker.py"


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
