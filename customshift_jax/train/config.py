"""The training configuration: a YAML file of known sections and keys, plus `key=value` overrides."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "checkpoint": None,      # our checkpoint dir, a diffusers pipeline/transformer folder or a single file
        "verify": True,          # check our checkpoint's content hashes at load (false: skip, for huge ones)
        "preset": None,          # without a checkpoint: random base weights of this preset (tests, benches)
        "num_layers": None,      # with `preset`: override its depth
        "init_seed": 0,          # with `preset`: seed of the random base weights
        "base_dtype": "fp32",    # storage dtype of the frozen base params ("bf16" halves their memory);
                                 # train.mode=base always loads fp32 (the params are the trained masters)
    },
    "lora": {"rank": 16, "alpha": 16.0},
    "data": {"path": None, "global_batch": 8, "shuffle": True, "flip_prob": 0.5},
    "train": {
        "steps": 1000, "seed": 0, "lr": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 1e-2,
        "clip_norm": 1.0, "accum_steps": 1, "dtype": "fp32", "remat": "none", "shift": "cads",
        "form": "two_pass", "text_dropout": 0.1, "ref_dropout": 0.05,
        # "customshift": train the two LoRAs and beta on a frozen base. "base": train every param of the base
        # MMDiT (initialised from model.checkpoint / model.preset) as a text-to-image model; it is written to
        # OUTPUT_DIR/model/ (our checkpoint, other components of model.checkpoint copied) instead of the LoRA.
        "mode": "customshift",
        "ema_decay": 0.0,        # train.mode=base: keep an EMA (ema = d ema + (1 - d) params) and export it; 0: off
    },
    "mesh": {"enabled": False, "data": 1, "fsdp": 1, "tensor": 1, "rules": "fsdp"},
    "checkpoint": {"every": 100, "keep": 3, "async": True},
    "log": {"every": 1, "tensorboard": True, "progress": "auto"},  # progress: "auto" = a bar on a terminal
    # Samples every `every` steps (0: never) with the current LoRAs, written to OUTPUT_DIR/samples/step-XXXXXX/.
    "sample": {
        "every": 0,
        "prompts": None,     # record indices of the prepared data (their captions); with `embeds`: prompt indices
        "embeds": None,      # .npz as `customshift generate --embeds` takes (no text encoder runs in training)
        "reference": 0,      # record index of the prepared data, or an image path (needs `vae`)
        "subject": None,     # record index whose subject-name embeddings are used (default: the reference's)
        "steps": 8, "guidance": 1.0, "gamma": 1.0, "seed": 0,
        "shift": 3.0,        # the flow-match scheduler's shift (SD3: 3.0)
        "vae": None,         # checkpoint or pipeline folder: decode to images (else a latent preview PNG)
    },
    "output_dir": None,
    "export_lora": True,         # write OUTPUT_DIR/lora/ at the end (train.mode=customshift)
    # Test hooks: sleep after each step (so a signal can land mid-run in the preemption tests).
    "debug": {"sleep_per_step": 0.0},
}


TRAIN_MODES = ("customshift", "base")
DEFAULTS_FLAT: dict[str, Any] = {f"{section}.{k}" if isinstance(keys, dict) else section: v
                                 for section, keys in DEFAULTS.items()
                                 for k, v in (keys.items() if isinstance(keys, dict) else [(None, keys)])}


def _check_train(t: dict) -> None:
    """Refuse an unknown train.mode and an EMA decay outside [0, 1) or outside base mode."""
    if t["mode"] not in TRAIN_MODES:
        raise ValueError(f"train.mode={t['mode']!r} is not known; expected one of: {', '.join(TRAIN_MODES)}.")
    d = t["ema_decay"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ValueError(f"train.ema_decay={d!r}: expected a number in [0, 1) (0 turns the EMA off).")
    if d > 0 and t["mode"] != "base":
        raise ValueError(f"train.ema_decay={d} needs train.mode=base (the LoRA training keeps no EMA); set "
                         "train.ema_decay=0 or train.mode=base.")


SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
# Keys whose value may be of another type than their default's: key -> the accepted types.
OTHER_TYPES: dict[str, tuple[type, ...]] = {"sample.reference": (int, str), "train.clip_norm": (int, float, type(None)),
                                            "log.progress": (bool, str)}


def _check_type(key: str, default: Any, value: Any) -> None:
    """A value of the default's type (a number where the default is a float); None defaults take anything."""
    if default is None:
        return
    accepted = OTHER_TYPES.get(key) or ((int, float) if type(default) is float else (type(default),))
    if isinstance(value, bool) and bool not in accepted:
        ok = False
    else:
        ok = isinstance(value, accepted)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
        raise ValueError(f"config key {key}={value!r}: expected {names} (the default is {default!r}).")


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
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
            _check_type(f"{where}{k}", default, v)
            base[k] = v


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    import yaml

    if "=" not in item or item.startswith("="):
        raise ValueError(f"bad override {item!r}: expected key=value, e.g. train.steps=100.")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


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
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections ({', '.join(DEFAULTS)}).")
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
    if cfg["log"]["progress"] not in (True, False, "auto"):
        raise ValueError(f"log.progress={cfg['log']['progress']!r}: expected true, false or auto (a bar on a terminal).")
    return cfg
