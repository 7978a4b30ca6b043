"""The training configuration: a YAML file of known sections and keys, plus `key=value` overrides."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from customshift_jax.customshift.cads import SHIFTS
from customshift_jax.numerics import FLOAT_DTYPES
from customshift_jax.models.mmdit.options import RunOptions

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "checkpoint": None,      # our checkpoint dir, a diffusers pipeline/transformer folder or a single file
        "verify": True,          # check our checkpoint's content hashes at load (false: skip, for huge ones)
        "preset": None,          # without a checkpoint: random base weights of this preset (tests, benches)
        "num_layers": None,      # with `preset`: override its depth
        "init_seed": 0,          # with `preset`: seed of the random base weights
        "base_dtype": "fp32",    # storage dtype of the frozen base params ("bf16" halves their memory);
                                 # train.mode=base always loads fp32 (the params are the trained masters)
        "attention": "xla",      # the training step's attention kernel: xla, blocked (less memory) or flash (Pallas)
    },
    "lora": {"rank": 16, "alpha": 16.0},
    "data": {"path": None, "global_batch": 8, "shuffle": True, "flip_prob": 0.5},
    "train": {
        "steps": 1000, "seed": 0, "lr": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 1e-2,
        "clip_norm": 1.0, "accum_steps": 1, "dtype": "fp32", "remat": "none", "shift": "cads",
        "form": "two_pass", "text_dropout": 0.1, "ref_dropout": 0.05,
        # shift: how the reference enters the CGB's attention, "cads" (CustomShift), "concat" (the baseline:
        # image queries read it unshifted) or "joint" (OminiControl-style: every query, text too, reads it)
        # "customshift": train the two LoRAs and beta on a frozen base. "base": train every param of the base
        # MMDiT (initialised from model.checkpoint / model.preset) as a text-to-image model; it is written to
        # OUTPUT_DIR/model/ (our checkpoint, other components of model.checkpoint copied) instead of the LoRA.
        "mode": "customshift",
        "ema_decay": 0.0,        # train.mode=base: keep an EMA (ema = d ema + (1 - d) params) and export it; 0: off
        "beta_lr_scale": 1.0,    # train.mode=customshift: beta (the learned shift) learns at train.lr x this
    },
    "mesh": {"enabled": False, "data": 1, "fsdp": 1, "tensor": 1, "rules": "fsdp"},
    "checkpoint": {"every": 100, "keep": 3, "async": True},
    # progress: "auto" = a bar on a terminal, else a loss line every line_every_s seconds; false: neither
    "log": {"every": 1, "tensorboard": True, "progress": "auto", "line_every_s": 30.0},
    # Samples every `every` steps (0: never) with the current LoRAs, written to OUTPUT_DIR/samples/step-XXXXXX/.
    "sample": {
        "every": 0,
        "prompts": None,     # record indices of the prepared data (their captions); with `embeds`: prompt indices
        "embeds": None,      # .npz as `customshift generate --embeds` takes (no text encoder runs in training)
        "reference": 0,      # record index of the prepared data, or an image path (needs `vae`)
        "subject": None,     # record index whose subject-name embeddings are used (default: the reference's)
        "steps": 8, "guidance": 1.0, "gamma": 1.0, "seed": 0,
        "schedule_shift": 3.0,  # the flow-match scheduler's shift (SD3: 3.0); not train.shift (cads or concat)
        "vae": None,         # checkpoint or pipeline folder: decode to images (else a latent preview PNG)
    },
    "output_dir": None,
    "export_lora": True,         # write OUTPUT_DIR/lora/ at the end (train.mode=customshift)
}


TRAIN_MODES = ("customshift", "base")
DEFAULTS_FLAT: dict[str, Any] = {f"{section}.{k}" if isinstance(keys, dict) else section: v
                                 for section, keys in DEFAULTS.items()
                                 for k, v in (keys.items() if isinstance(keys, dict) else [(None, keys)])}


def _check_train(t: dict) -> None:
    """Refuse an EMA outside base mode and fewer steps than one accumulated update."""
    d = t["ema_decay"]
    if d > 0 and t["mode"] != "base":
        raise ValueError(f"train.ema_decay={d} needs train.mode=base (the LoRA training keeps no EMA); set "
                         "train.ema_decay=0 or train.mode=base.")
    if t["steps"] < t["accum_steps"]:
        raise ValueError(f"train.steps={t['steps']} is fewer than train.accum_steps={t['accum_steps']}: no optimizer "
                         "update would be applied; raise train.steps or lower train.accum_steps.")


SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
# Keys whose value may be of another type than their default's: key -> the accepted types.
OTHER_TYPES: dict[str, tuple[type, ...]] = {"sample.reference": (int, str), "train.clip_norm": (int, float, type(None)),
                                            "log.progress": (bool, str)}
# Keys whose default is None: key -> the accepted types besides null.
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "model.checkpoint": (str,), "model.preset": (str,), "model.num_layers": (int,), "data.path": (str,),
    "sample.prompts": (list,), "sample.embeds": (str,), "sample.subject": (int,), "sample.vae": (str,),
    "output_dir": (str,)}


@dataclasses.dataclass(frozen=True)
class Range:
    """Where a number may lie: [low, high], an end left out by None, made strict by `open_low` / `open_high`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    means: str = ""
    also: tuple[float, ...] = ()  # values allowed outside the range (-1: "the rest" of a mesh axis)

    def holds(self, v: float) -> bool:
        if v in self.also:
            return True
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return self.high is None or (v < self.high if self.open_high else v <= self.high)

    def text(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        lo = None if self.low is None else f"{'>' if self.open_low else '>='} {_number(self.low)}"
        hi = None if self.high is None else f"{'<' if self.open_high else '<='} {_number(self.high)}"
        where = " and ".join(x for x in (lo, hi) if x) + "".join(f" or {_number(x)}" for x in self.also)
        return f"{kind}{' ' + where if where else ''}{f' ({self.means})' if self.means else ''}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _count(low: int = 1, means: str = "") -> Range:
    return Range(low, means=means)


_FRACTION = Range(0.0, 1.0, means="a probability")
_SEED = Range(0, 2**32 - 1, means="a seed")
_MESH_AXIS = Range(1, also=(-1,), means="devices along the axis; -1: the rest, on one axis at most")
# Every number of the config -> its range: checked when the config is read, so a run never starts on -5 steps.
RANGES: dict[str, Range] = {
    "model.num_layers": _count(1, "the preset's depth"),
    "model.init_seed": _SEED,
    "lora.rank": _count(1),
    "lora.alpha": Range(0.0, open_low=True, means="the LoRA scale is alpha / rank"),
    "data.global_batch": _count(1),
    "data.flip_prob": _FRACTION,
    "train.steps": _count(1, "micro-steps to run"),
    "train.seed": _SEED,
    "train.lr": Range(0.0, open_low=True),
    "train.warmup_steps": _count(0),
    "train.weight_decay": Range(0.0),
    "train.clip_norm": Range(0.0, open_low=True, means="null: no clipping"),
    "train.accum_steps": _count(1),
    "train.text_dropout": _FRACTION,
    "train.ref_dropout": _FRACTION,
    "train.ema_decay": Range(0.0, 1.0, open_high=True, means="0 turns the EMA off"),
    "train.beta_lr_scale": Range(0.0, open_low=True, means="beta's learning rate is train.lr x this"),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "checkpoint.every": _count(1, "steps between checkpoints"),
    "checkpoint.keep": _count(1, "checkpoints kept"),
    "log.every": _count(1, "steps between metric lines"),
    "log.line_every_s": Range(0.0, open_low=True, means="seconds between loss lines without a bar"),
    "sample.every": _count(0, "0: never"),
    "sample.reference": _count(0, "a record index, or an image path"),
    "sample.subject": _count(0, "a record index"),
    "sample.steps": _count(1),
    "sample.guidance": Range(0.0),
    "sample.gamma": Range(0.0),
    "sample.seed": _SEED,
    "sample.schedule_shift": Range(0.0, open_low=True),
}
DTYPES = tuple(FLOAT_DTYPES)
# Keys of a fixed set of words -> the words (tests/train/test_train_config.py keeps them in step with the code taking them).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.base_dtype": DTYPES,
    "model.attention": ("xla", "blocked", "flash"),
    "train.schedule": ("constant", "cosine"),
    "train.dtype": DTYPES,
    "train.remat": ("none", "dots", "full"),
    "train.shift": SHIFTS,
    "train.form": ("two_pass", "single"),
    "train.mode": TRAIN_MODES,
    "mesh.rules": ("dp", "fsdp", "tp", "fsdp_tp", "context"),
}


def _check_type(key: str, default: Any, value: Any) -> None:
    """A value of the default's type (a number where the default is a float); None defaults take their listed types."""
    if default is None:
        accepted = NULLABLE_TYPES.get(key, (object,)) + (type(None),)
    else:
        accepted = OTHER_TYPES.get(key) or ((int, float) if type(default) is float else (type(default),))
    if isinstance(value, bool) and bool not in accepted:
        ok = False
    else:
        ok = isinstance(value, accepted)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
        raise ValueError(f"config key {key}={value!r}: expected {names} (the default is {default!r}).")


def _check_value(key: str, value: Any) -> None:
    """A number in its key's range, a word among its key's choices; one line naming the key otherwise."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"config key {key}={value!r}: expected one of {', '.join(CHOICES[key])}.")
    rule = RANGES.get(key)
    if rule is None or value is None or isinstance(value, str):
        return
    if key == "sample.prompts":
        return
    if not rule.holds(float(value)):
        raise ValueError(f"config key {key}={value!r}: expected {rule.text(isinstance(value, int))}.")


def _check_prompts(value: Any) -> None:
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"config key sample.prompts={value!r}: expected a list of record indices >= 0, or null.")


# Old key -> its name now: configs (and runs' saved config.yaml) written before the rename still load.
RENAMED_KEYS = {"sample.shift": "sample.schedule_shift"}


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        k = RENAMED_KEYS.get(f"{where}{k}", f"{where}{k}")[len(where):]
        if k not in base:
            raise ValueError(f"unknown config key {where}{k}; known keys here: {', '.join(map(str, base))}.")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"config key {where}{k} must be a mapping of {', '.join(base[k])}.")
            _merge(base[k], v, f"{where}{k}.")
        else:
            default = DEFAULTS_FLAT.get(f"{where}{k}")
            if type(default) is float and isinstance(v, str) and SCIENTIFIC.fullmatch(v.strip()):
                v = float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string
            key = f"{where}{k}"
            _check_type(key, default, v)
            if isinstance(v, int) and not isinstance(v, bool) and (type(default) is float or key == "train.clip_norm"):
                v = float(v)  # typed once here: a float key holds a float whatever the YAML wrote
            _check_value(key, v)
            if key == "sample.prompts":
                _check_prompts(v)
            base[k] = v


def yaml_error(e: Exception, where: str) -> str:
    """A YAML parse error as one line: where (file and line), what the parser met."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{where}{at}: not valid YAML ({' '.join(what.split())})"


def _drop_old_debug(data: dict, path: Path) -> None:
    """A run's saved config.yaml of before holds `debug: {sleep_per_step: 0.0}` (a test hook, now the environment
    variable loop.SLEEP_ENV): the unset hook is dropped so that such a config still loads; a set one is refused."""
    if "debug" not in data:
        return
    debug = data["debug"] or {}
    if isinstance(debug, dict) and set(debug) <= {"sleep_per_step"} and not debug.get("sleep_per_step"):
        del data["debug"]
        return
    raise ValueError(f"{path}: the debug section is gone (debug.sleep_per_step is now the environment variable "
                     "CUSTOMSHIFT_TEST_SLEEP_PER_STEP, for tests); remove the section.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    import yaml

    if "=" not in item or item.startswith("="):
        raise ValueError(f"bad override {item!r}: expected key=value, e.g. train.steps=100.")
    key, value = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(yaml_error(e, f"override {item!r}") + "; quote the value.") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """DEFAULTS, then the YAML file, then the overrides; unknown keys and missing required ones are errors."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(yaml_error(e, str(path)) + "; fix that line.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections ({', '.join(DEFAULTS)}).")
        _drop_old_debug(data, path)
        _merge(cfg, data, "")
    for item in overrides:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "")
    if cfg["output_dir"] is None:
        raise ValueError("missing config key output_dir (where checkpoints, metrics and the LoRA go).")
    if cfg["data"]["path"] is None:
        raise ValueError("missing config key data.path (a folder written by `customshift prepare`).")
    m = cfg["model"]
    if m["checkpoint"] is None and m["preset"] is None:
        raise ValueError("missing config key model.checkpoint (or model.preset for random base weights).")
    if m["checkpoint"] is not None and m["preset"] is not None:
        raise ValueError(f"model.checkpoint={m['checkpoint']} and model.preset={m['preset']} are both set: the "
                         "checkpoint brings its own architecture. Add model.preset=null (the config file sets it), "
                         "or drop model.checkpoint for random weights of the preset.")
    if m["preset"] is None:
        m["num_layers"] = None  # only a preset's depth can be changed: the saved config says what ran
    _check_train(cfg["train"])
    rest = [f"mesh.{a}" for a in ("data", "fsdp", "tensor") if cfg["mesh"][a] == -1]
    if len(rest) > 1:
        raise ValueError(f"{' and '.join(rest)} are both -1: one mesh axis at most takes the rest of the devices.")
    if cfg["log"]["progress"] not in (True, False, "auto"):
        raise ValueError(f"log.progress={cfg['log']['progress']!r}: expected true, false or auto (a bar on a terminal).")
    return cfg


def run_options(cfg: dict[str, Any]) -> RunOptions:
    """How the training step runs, from the validated config (`load_config`): train.dtype, model.attention and
    train.remat as one `RunOptions`, the one place the loop and its samples read them."""
    t = cfg["train"]
    return RunOptions(dtype=t["dtype"], backend=cfg["model"]["attention"], remat=t["remat"])
