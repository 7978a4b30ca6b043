"""Flow-match Euler sigmas and timesteps, equal to diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps`.

Computed once on the host with numpy (same dtypes and operation order as diffusers, so the float32 values
match bit for bit), then passed into the jitted sampler as arrays: a new step count is a new input, not
new Python constants in the trace.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.struct
import numpy as np

# diffusers' FlowMatchEulerDiscreteScheduler.__init__ defaults (0.42): a config.json that omits a field
# gets these when diffusers loads it, so we fill them the same way.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


@flax.struct.dataclass
class Schedule:
    """The sampling schedule: sigmas (T+1,) float32 ending in 0, timesteps (T,) float32 on the 0-1000 scale.

    A pytree of arrays (numpy on the host, jax inside jit); step t goes from sigmas[t] to sigmas[t+1] and
    calls the model at timesteps[t] (= 1000 * sigmas[t], as diffusers passes it to the transformer).
    """

    sigmas: Any  # (T+1,) float32
    timesteps: Any  # (T,) float32

    @property
    def num_steps(self) -> int:
        """T, the number of model steps (static: read from the array shape)."""
        return int(self.timesteps.shape[0])


def load_scheduler_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config with diffusers' defaults filled in, from a dict, a `scheduler_config.json`,
    a `scheduler/` folder or a pipeline folder (its `scheduler/scheduler_config.json`)."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        candidates = [path] if path.is_file() else [path / SCHEDULER_CONFIG_NAME,
                                                    path / "scheduler" / SCHEDULER_CONFIG_NAME]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"no scheduler config at {path}: expected a {SCHEDULER_CONFIG_NAME} file, a scheduler folder "
                f"holding one, or a pipeline folder with scheduler/{SCHEDULER_CONFIG_NAME}")
        try:
            raw = json.loads(found.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{found}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{found}: expected a JSON object of scheduler fields, got {type(raw).__name__}.")
    cls = raw.get("_class_name")
    if cls is not None and cls != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"scheduler is {cls!r}; only FlowMatchEulerDiscreteScheduler (SD3's) is supported.")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    for k, v in SCHEDULER_DEFAULTS.items():
        config.setdefault(k, v)
    _check_supported(config)
    return config


def _check_supported(config: Mapping[str, Any]) -> None:
    """Refuse the scheduler options the deterministic Euler sampler does not reproduce."""
    if config["stochastic_sampling"]:
        raise ValueError("scheduler config has stochastic_sampling=True; only the deterministic Euler step is "
                         "implemented (set it to false).")
    if config["invert_sigmas"]:
        raise ValueError("scheduler config has invert_sigmas=True (a Mochi-only option); SD3 does not use it.")
    n = sum(bool(config[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
    if n > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set.")
    if config["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {config['time_shift_type']!r}.")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for resolution-dependent shifting: linear in the number of image tokens (diffusers' `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Number of image tokens of a latent (h, w) after patchifying, as the SD3 pipeline counts them for `mu`."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def mu_for(config: Mapping[str, Any], seq_len: int) -> float:
    """The `mu` that `StableDiffusion3Pipeline.__call__` passes when the scheduler uses dynamic shifting."""
    fields = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    missing = [k for k in fields if config.get(k) is None]
    if missing:
        raise ValueError(f"use_dynamic_shifting needs {missing} in the scheduler config (or pass mu=).")
    return calculate_shift(seq_len, *(config[k] for k in fields))


def _init_sigma_range(config: Mapping[str, Any]) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the scheduler's 1000-step training table, in float32 as diffusers' __init__."""
    n = int(config["num_train_timesteps"])
    ends = np.array([n, 1], np.float32)  # the first and last of linspace(1, n, n)[::-1]
    sigmas = ends / np.float32(n)
    if not config["use_dynamic_shifting"]:
        shift = config["shift"]
        sigmas = np.float32(shift) * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)
    return float(sigmas[0]), float(sigmas[1])


def _time_shift(config: Mapping[str, Any], mu: float, t: np.ndarray) -> np.ndarray:
    if config["time_shift_type"] == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def _karras(sigmas: np.ndarray, n: int) -> np.ndarray:
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    lo, hi = sigmas[-1].item() ** (1 / rho), sigmas[0].item() ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(sigmas: np.ndarray, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigmas[0].item()), math.log(sigmas[-1].item()), n))


def _beta(sigmas: np.ndarray, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    try:
        import scipy.stats
    except ImportError:
        raise ImportError("use_beta_sigmas needs scipy (pip install scipy).") from None
    lo, hi = sigmas[-1].item(), sigmas[0].item()
    return np.array([lo + scipy.stats.beta.ppf(t, alpha, beta) * (hi - lo) for t in 1 - np.linspace(0, 1, n)])


def make_schedule(
    scheduler: str | Path | Mapping[str, Any],
    num_inference_steps: int | None = None,
    *,
    image_seq_len: int | None = None,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
) -> Schedule:
    """The schedule `StableDiffusion3Pipeline(num_inference_steps=, sigmas=, mu=)` runs, as numpy float32.

    `scheduler` is a scheduler config dict or a path (see `load_scheduler_config`). With dynamic shifting
    give `image_seq_len` (see `image_seq_len(h, w, patch)`) so that `mu` is computed as the pipeline does,
    or `mu` itself. `sigmas` are custom sigmas, as the pipeline's `sigmas=` argument.
    """
    config = load_scheduler_config(scheduler)
    if sigmas is not None:
        sigmas = np.array(sigmas).astype(np.float32)
        if sigmas.ndim != 1 or sigmas.size == 0:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {sigmas.shape}.")
        if num_inference_steps is not None and num_inference_steps != sigmas.size:
            raise ValueError(f"num_inference_steps={num_inference_steps} but {sigmas.size} sigmas were given.")
        num_inference_steps = sigmas.size
    elif num_inference_steps is None or int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    n = int(num_inference_steps)

    if config["use_dynamic_shifting"] and mu is None:
        if image_seq_len is None:
            raise ValueError("the scheduler uses dynamic shifting: pass image_seq_len= (the number of image "
                             "tokens, see sampling.image_seq_len) or mu=.")
        mu = mu_for(config, int(image_seq_len))

    if sigmas is None:
        sigma_max, sigma_min = _init_sigma_range(config)
        t_train = float(config["num_train_timesteps"])
        timesteps = np.linspace(sigma_max * t_train, sigma_min * t_train, n)  # float64, as set_timesteps
        sigmas = timesteps / config["num_train_timesteps"]
    if config["use_dynamic_shifting"]:
        sigmas = _time_shift(config, mu, sigmas)
    else:
        shift = config["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if config["shift_terminal"]:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - config["shift_terminal"])
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for one step: refused below
            sigmas = 1 - (one_minus_z / scale_factor)
    if config["use_karras_sigmas"]:
        sigmas = _karras(sigmas, n)
    elif config["use_exponential_sigmas"]:
        sigmas = _exponential(sigmas, n)
    elif config["use_beta_sigmas"]:
        sigmas = _beta(sigmas, n)

    sigmas = np.asarray(sigmas).astype(np.float32)  # (T,)
    if not np.all(np.isfinite(sigmas)):
        raise ValueError(f"the schedule has non-finite sigmas {sigmas.tolist()} (e.g. shift_terminal with one "
                         "step, or custom sigmas of 0 with dynamic shifting); use more steps or other sigmas.")
    timesteps = sigmas * np.float32(config["num_train_timesteps"])  # float32 product, as torch does it
    sigmas = np.concatenate([sigmas, np.zeros((1,), np.float32)])  # (T+1,)
    return Schedule(sigmas=sigmas, timesteps=timesteps.astype(np.float32))
