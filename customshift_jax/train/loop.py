"""The `customshift train` loop: base params, data, jitted (optionally sharded) step, orbax checkpoints with
exact resume, SIGTERM preemption, non-finite-loss stop, metrics, and the export at the end: the LoRA
(train.mode=customshift) or the trained base MMDiT as our checkpoint at OUTPUT_DIR/model (train.mode=base)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from customshift_jax.customshift.axes import BETA
from customshift_jax.io.checkpoint import (
    CONFIG_NAME,
    check_destination,
    is_checkpoint,
    load_checkpoint,
    read_marker,
    save_checkpoint,
)
from customshift_jax.io.folder_lock import exclusive_folder
from customshift_jax.io.loading import load_transformer
from customshift_jax.io.lora_files import TEXT_SETTINGS_KEY, save_lora_files, to_state_dict
from customshift_jax.io.safe_files import refuse_link, write_text
from customshift_jax.io.train_state import (
    open_train_checkpoints,
    read_latest_train_state,
    restore_train_state,
    save_train_state,
)
from customshift_jax.models.mmdit.api import init_mmdit
from customshift_jax.models.mmdit.config import get_preset
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.options import as_dtype
from customshift_jax.parallel import sharding as shd
from customshift_jax.parallel.distributed import gather
from customshift_jax.train.base_step import init_base_train_state, make_base_train_step, model_params
from customshift_jax.train.config import run_options
from customshift_jax.train.data import BatchIterator, ShardDataset, prepared_text_settings
from customshift_jax.train.loss_lines import LossLines
from customshift_jax.train.metrics import MetricsLogger
from customshift_jax.train.optim import make_optimizer
from customshift_jax.train.samples import maybe_sampler
from customshift_jax.train.step import TRAIN_STEP_AXES, init_train_state, make_train_step

EXIT_NONFINITE = 3
# A test hook, not a setting: seconds to sleep after each step, so that a signal lands mid-run in the tests.
SLEEP_ENV = "CUSTOMSHIFT_TEST_SLEEP_PER_STEP"


class _Preempt:
    """SIGTERM (a preemption) or SIGINT (Ctrl-C) sets a flag; the loop saves a checkpoint at the next step
    boundary and exits cleanly, saying how to resume."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def show_progress(setting: bool | str, on_terminal: bool) -> bool:
    """log.progress: true, false, or "auto" (the default): a bar with loss and steps/s when stderr is a terminal."""
    return setting is True or (setting == "auto" and on_terminal)


def log_above_bar(log: Callable[[str], Any]) -> Callable[[str], Any]:
    """`log`, run with tqdm's bars cleared and redrawn after: a message gets its own line, not the bar's end."""
    from tqdm import tqdm

    def said(message: str) -> Any:
        with tqdm.external_write_mode():
            return log(message)

    return said


def _check_text_widths(dataset, config, path) -> None:
    """Refuse shards whose text embeddings do not fit the model (prepared with another model's encoders)."""
    widths = {name: parts[0].shape[-1] for name, parts in dataset.parts.items() if "embeds" in name or "pooled" in name}
    for name, width in widths.items():
        want = config.pooled_projection_dim if "pooled" in name else config.joint_attention_dim
        if width != want:
            raise ValueError(f"{path}: {name} are {width} wide but the model takes {want}: the data was prepared "
                             "with another model's text encoders. Set model.checkpoint to the model the data was "
                             "prepared for, or run `customshift prepare` with this model's text encoders.")


def load_base(mcfg: dict) -> tuple[Any, Any]:
    """(MMDiTConfig, frozen base params) from `model.checkpoint`, or random ones of `model.preset`."""
    import jax

    dtype = as_dtype(mcfg["base_dtype"])
    if mcfg["checkpoint"] is not None:
        return load_transformer(mcfg["checkpoint"], dtype=dtype, verify=mcfg["verify"])
    config = get_preset(mcfg["preset"])
    if mcfg["num_layers"]:
        config = dataclasses.replace(config, num_layers=mcfg["num_layers"])
    params = jax.jit(lambda k: init_mmdit(config, k, param_dtype=dtype))(jax.random.key(mcfg["init_seed"]))
    return config, params


def step_parts(cfg: dict, config, base, lora_config, optimizer, schedule) -> tuple:
    """(initial state, base argument of the step, mesh or None -> step) for `train.mode`; on a mesh the step is
    the plain one, built with the activation constraints, wrapped by `ShardedFunction`."""
    t = cfg["train"]
    step_kw = dict(seed=t["seed"], schedule=schedule, accum_steps=t["accum_steps"], text_dropout=t["text_dropout"])
    if t["mode"] == "base":
        state = init_base_train_state(base, optimizer, ema_decay=t["ema_decay"])
        make = functools.partial(make_base_train_step, config, optimizer, ema_decay=t["ema_decay"], **step_kw)
        base = {}
    else:
        state = init_train_state(config, lora_config, optimizer, t["seed"])
        make = functools.partial(make_train_step, config, lora_config, optimizer, shift=t["shift"], form=t["form"],
                                 ref_dropout=t["ref_dropout"], **step_kw)

    def step_on(mesh):
        options, rules = run_options(cfg), cfg["mesh"]["rules"]
        if mesh is None:
            return make(options)
        return shd.ShardedFunction(make(shd.on_mesh(options, mesh, rules)), mesh, rules, *TRAIN_STEP_AXES)

    return state, base, step_on


@dataclasses.dataclass
class TrainParts:
    """Everything the loop needs, built from the resolved config by `build`."""

    config: Any          # MMDiTConfig
    base: Any            # the frozen base params (LoRA mode), or {} (train.mode=base: the state holds them)
    lora_config: Any            # LoRAConfig
    dataset: Any         # ShardDataset
    it: Any              # BatchIterator (its position is checkpointed)
    optimizer: Any       # optax.GradientTransformation
    state: Any           # TrainState
    jstep: Callable      # jitted step(state, base, batch) -> (state, metrics)
    put_batch: Callable  # host batch -> device batch (sharded on the mesh)
    mesh: Any            # jax Mesh, or None


def build(cfg: dict) -> TrainParts:
    """Everything the loop needs, from the resolved config (no side effects on disk)."""
    import jax

    t, d = cfg["train"], cfg["data"]
    # train.mode=base trains the loaded params themselves: fp32 masters, whatever model.base_dtype says.
    config, base = load_base({**cfg["model"], "base_dtype": "fp32"} if t["mode"] == "base" else cfg["model"])
    lora_config = LoRAConfig(rank=cfg["lora"]["rank"], alpha=cfg["lora"]["alpha"])
    dataset = ShardDataset(d["path"])
    lat_shape = dataset.index["latent_shape"]
    if lat_shape[0] != config.in_channels:
        raise ValueError(f"{d['path']}: latents have {lat_shape[0]} channels, the model takes {config.in_channels}.")
    _check_text_widths(dataset, config, d["path"])
    it = BatchIterator(dataset, d["global_batch"], seed=t["seed"], shuffle=d["shuffle"], flip_prob=d["flip_prob"])
    optimizer, schedule = make_optimizer(
        t["lr"], warmup_steps=t["warmup_steps"], schedule=t["schedule"], total_steps=t["steps"] // t["accum_steps"],
        weight_decay=t["weight_decay"], clip_norm=t["clip_norm"], accum_steps=t["accum_steps"],
        lr_scale_by_name={BETA: t["beta_lr_scale"]} if t["mode"] == "customshift" else None)
    state, base, step_on = step_parts(cfg, config, base, lora_config, optimizer, schedule)
    m = cfg["mesh"]
    if m["enabled"]:
        mesh = shd.make_mesh(m["data"], m["fsdp"], m["tensor"])
        sharded = step_on(mesh)
        global_batch = {k: jax.ShapeDtypeStruct((d["global_batch"],) + v.shape, v.dtype)
                        for k, v in dataset.get(0).items()}  # a batch stacks records: shapes from one
        # Trainable tree, Adam moments and base laid out by the rules (not replicated); the batch split along "batch".
        (_, _, batch_sh), _ = sharded.shardings(state, base, global_batch)
        jstep = sharded.jitted(state, base, global_batch)
        state, base = sharded.place(state, base)

        def put_batch(batch):
            if jax.process_count() == 1:
                return {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
            return {k: jax.make_array_from_process_local_data(batch_sh[k], v, global_batch[k].shape)
                    for k, v in batch.items()}
    else:
        mesh = None
        jstep = jax.jit(step_on(None))

        def put_batch(batch):
            return batch

    return TrainParts(config=config, base=base, lora_config=lora_config, dataset=dataset, it=it, optimizer=optimizer,
                      state=state, jstep=jstep, put_batch=put_batch, mesh=mesh)


def export_lora(out: Path, state, lora, text_settings: dict | None = None) -> list[Path]:
    """Write the trained LoRAs and beta in the PEFT / diffusers-named format (`customshift_jax.io.lora_files`)."""
    trainable = gather(state.trainable)
    return save_lora_files(out, to_state_dict(trainable["rab"], trainable["cgb"]), lora, text_settings=text_settings)


def _other_components(src: Any) -> dict[str, tuple[Any, Any]]:
    """{name: (config dict, params loader)} of every non-transformer component of our checkpoint `src`
    (none when `src` is not one of ours); loaders, so one component at a time is in memory while copying."""
    if src is None or not is_checkpoint(src):
        return {}
    entries = read_marker(src).get("components", {})
    return {name: (json.loads((Path(src) / entry.get("config", f"{name}/{CONFIG_NAME}")).read_text()),
                   lambda name=name: load_checkpoint(src, [name])[name][1])
            for name, entry in entries.items() if name != "transformer"}


def export_model(dst: Path, params, config, source: Any = None, metadata: dict | None = None) -> list[str]:
    """Write `params` (host arrays) as the transformer of our checkpoint at `dst`, with the other components of
    `source` (e.g. the VAE) copied, so that `model.checkpoint=dst` and `load_transformer(dst)` take it; returns
    the component names. An earlier checkpoint at `dst` is replaced once the new one is complete."""
    components = {"transformer": (config, params), **_other_components(source)}
    save_checkpoint(dst, components, overwrite=True, metadata=metadata)
    return list(components)


def _check_model_destination(dst: Path) -> None:
    """Refuse, before training, an OUTPUT_DIR/model that the export at the end could not replace."""
    check_destination(dst, True, what="trained model")


def train(cfg: dict, *, resume: bool = False, log=print) -> int:
    """Run training as configured; returns the process exit code (0 done or preempted, 3 non-finite loss).
    Process 0 holds output_dir's lock throughout: a second run into the same folder is refused, naming this one."""
    import jax

    out = Path(cfg["output_dir"])
    with exclusive_folder(out, "output_dir", log=log) if jax.process_index() == 0 else contextlib.nullcontext(out):
        return _train(cfg, out, resume, log)


def _progress(cfg: dict, total: int, start: int, log) -> tuple[Any, Any, Callable]:
    """(tqdm bar or None, LossLines or None, log) for process 0: a bar on a terminal (log then prints above it),
    else (nohup, SLURM) a loss line every log.line_every_s seconds; neither when log.progress is false."""
    import jax

    if jax.process_index() != 0:
        return None, None, log
    if show_progress(cfg["log"]["progress"], sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)
        return bar, None, log_above_bar(log)
    if cfg["log"]["progress"] is not False:
        return None, LossLines(total, start, cfg["log"]["line_every_s"], log), log
    return None, None, log


def _export_trained(cfg: dict, out: Path, state, parts: TrainParts, total: int, log) -> None:
    """After the last step: the trained model folder (train.mode=base) or the LoRA files (export_lora)."""
    import jax

    if cfg["train"]["mode"] == "base":
        _export_base(cfg, out / "model", state, parts.config, total, log)
    elif cfg["export_lora"] and jax.process_index() == 0:
        files = export_lora(out / "lora", state, parts.lora_config, prepared_text_settings(cfg["data"]["path"]))
        log(f"exported the LoRA: {', '.join(str(f) for f in files)}")


def _train(cfg: dict, out: Path, resume: bool, log) -> int:
    """`train` inside output_dir's lock: build, restore, the step loop, checkpoints and the export."""
    import jax

    ckpt_dir = refuse_link(out / "checkpoints", "checkpoint folder")  # orbax would write through a link
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ValueError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another output_dir.")
    if cfg["train"]["mode"] == "base":
        _check_model_destination(out / "model")
    out.mkdir(parents=True, exist_ok=True)
    seed, total = cfg["train"]["seed"], cfg["train"]["steps"]
    parts = build(cfg)
    state, it, jstep, put_batch = parts.state, parts.it, parts.jstep, parts.put_batch
    sampler = maybe_sampler(cfg, parts, out)
    sample_every = cfg["sample"]["every"]
    mngr = open_train_checkpoints(ckpt_dir, cfg["checkpoint"]["keep"], cfg["checkpoint"]["async"])
    start = 0
    if resume:
        state, start = restore_train_state(mngr, state, it, seed, log)
        log(f"resumed from step {start}" if start else "no checkpoint to resume from: starting at step 0")
    if jax.process_index() == 0:
        import yaml

        write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False), what="run config")
    metrics = None
    if jax.process_index() == 0:
        metrics = MetricsLogger(out, tensorboard=cfg["log"]["tensorboard"], resumed_at=start)
        if metrics.cut:
            log(f"{out / 'metrics.jsonl'}: cut {metrics.cut} line(s) after step {start} (steps run again, or torn)")
    preempt = _Preempt()
    sleep_per_step = float(os.environ.get(SLEEP_ENV) or 0)
    every, log_every = cfg["checkpoint"]["every"], cfg["log"]["every"]
    gb = cfg["data"]["global_batch"]
    bar, lines, log = _progress(cfg, total, start, log)
    last_saved = start if start else None
    code = 0
    t_last, n_last = time.perf_counter(), start
    ctx = jax.set_mesh(parts.mesh) if parts.mesh is not None else contextlib.nullcontext()
    try:
        with ctx:
            step = start
            while step < total:
                if preempt.requested:
                    if last_saved != step:
                        save_train_state(mngr, step, state, it, seed)
                    mngr.wait_until_finished()
                    log(f"{preempt.requested}: saved step {step} to {ckpt_dir}; resume with the same command and "
                        "--resume.")
                    return 0
                state, m = jstep(state, parts.base, put_batch(next(it)))
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    mngr.wait_until_finished()
                    good = mngr.latest_step()
                    log(f"error: non-finite loss ({loss}) at step {step}; stopping. The last good checkpoint is "
                        + (f"step {good} in {ckpt_dir}." if good is not None else "none (nothing was saved)."))
                    code = EXIT_NONFINITE
                    return code
                step += 1
                if sleep_per_step:
                    time.sleep(sleep_per_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if lines is not None:
                    lines.update(step, loss)
                if metrics is not None and (step % log_every == 0 or step == total):
                    now = time.perf_counter()
                    sps = (step - n_last) / max(now - t_last, 1e-9)
                    t_last, n_last = now, step
                    values = {k: float(v) for k, v in m.items()}
                    values.update(steps_per_s=sps, images_per_s=sps * gb)
                    metrics.log(step, values)
                if sampler is not None and step % sample_every == 0:
                    sampler(model_params(state), parts.base, step, metrics)
                if step % every == 0 or step == total:
                    save_train_state(mngr, step, state, it, seed)
                    last_saved = step
            mngr.wait_until_finished()
            _export_trained(cfg, out, state, parts, total, log)
            log(f"done: {total} steps; checkpoints in {ckpt_dir}")
            return code
    finally:
        preempt.restore()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        mngr.wait_until_finished()
        mngr.close()


def _export_base(cfg: dict, dst: Path, state, config, steps: int, log) -> None:
    """train.mode=base: gather the trained weights (EMA if kept) on every process; process 0 writes them."""
    import jax

    weights = gather(model_params(state))  # a collective: every process takes part
    if jax.process_index() != 0:
        return
    ema = cfg["train"]["ema_decay"]
    meta = {"trained": {"by": "customshift train (train.mode=base)", "steps": steps, "ema_decay": ema}}
    text = prepared_text_settings(cfg["data"]["path"])  # what the data was encoded with: generate's defaults
    meta.update({TEXT_SETTINGS_KEY: text} if text else {})
    names = export_model(dst, weights, config, cfg["model"]["checkpoint"], meta)
    log(f"wrote the trained transformer{' (EMA weights)' if ema > 0 else ''} to {dst} "
        f"(components: {', '.join(names)}); use it with model.checkpoint={dst}")


def final_trainable(output_dir: str | Path) -> dict[str, np.ndarray]:
    """The latest checkpoint of a run as numpy, for comparisons: {"step": its step, "state/<parameter path>": array}."""
    return read_latest_train_state(Path(output_dir) / "checkpoints")
