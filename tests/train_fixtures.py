"""Helpers for the training tests: a synthetic prepared dataset at the tiny shape and the trainer subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `train` is a top-level package of the repo (until the editable install lists it)
    sys.path.insert(0, str(ROOT))

from customshift_jax.train.data import ShardWriter  # noqa: E402


def write_synthetic_dataset(out: Path, n: int = 4, *, latent: int = 8, text_len: int = 6, seed: int = 0,
                            shard_size: int = 3) -> Path:
    """Random latents and embeddings with the shapes of the tiny preset (flipped latents included)."""
    rng = np.random.default_rng(seed)
    w = ShardWriter(out, shard_size)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    lat, ref = f(n, 16, latent, latent), f(n, 16, latent, latent)
    w.add({"latents": lat, "ref_latents": ref, "latents_flip": lat[..., ::-1], "ref_latents_flip": ref[..., ::-1],
           "prompt_embeds": f(n, text_len, 32), "pooled": f(n, 24), "subject_embeds": f(n, text_len, 32),
           "subject_pooled": f(n, 24)})
    w.close({"size": latent * 2, "latent_shape": [16, latent, latent], "flip": True})
    return out


def trainer_env(cache_dir: Path) -> dict:
    """The subprocess environment: same device count and precision as the tests, shared compilation cache."""
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def trainer_cmd(config: Path, *overrides: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "customshift_jax.cli.main", "train", "--config", str(config),
            *(["--resume"] if resume else []), *overrides]


def start_trainer(config: Path, *overrides: str, cache_dir: Path, resume: bool = False, log: Path,
                  sleep_per_step: float = 0.0) -> subprocess.Popen:
    """The trainer in a subprocess; `sleep_per_step` > 0 slows it (the loop's test hook) so a signal lands mid-run."""
    from customshift_jax.train.loop import SLEEP_ENV

    env = {**trainer_env(cache_dir), **({SLEEP_ENV: str(sleep_per_step)} if sleep_per_step else {})}
    return subprocess.Popen(trainer_cmd(config, *overrides, resume=resume), cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
