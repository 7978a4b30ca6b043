"""Train CustomShift's two LoRAs (RAB and CGB) and beta on prepared data, or (train.mode=base) the base SD3
MMDiT itself, every param, as a text-to-image model.

Examples:
  customshift train --config train/configs/tiny.yaml output_dir=runs/tiny train.steps=200
  customshift train --config train/configs/sd35_medium_v5e8.yaml --resume
  customshift train --config train/configs/sd3_medium_v5p64.yaml --distributed   # on every worker of a pod slice
  customshift train --config train/configs/tiny.yaml output_dir=runs/base train.mode=base train.ema_decay=0.999

Overrides are `section.key=value` (value parsed as YAML). --resume restores the LoRAs, beta, optimizer
state, data position and RNG from OUTPUT_DIR/checkpoints. SIGTERM saves a checkpoint and exits 0.
With sample.every=M, samples from fixed prompts, reference and noise go to OUTPUT_DIR/samples/step-XXXXXX/
and TensorBoard every M steps (see the `sample` section of train/config.py).

train.mode: "customshift" (default: the LoRAs and beta on a frozen base, exported to OUTPUT_DIR/lora/) or
"base" (the whole MMDiT, initialised from model.checkpoint or model.preset, written at the end as our
checkpoint OUTPUT_DIR/model/ with model.checkpoint's other components, e.g. the VAE, copied; pass it as
model.checkpoint to a following LoRA run). train.ema_decay: with train.mode=base, d > 0 keeps an EMA of the
weights (ema = d ema + (1 - d) params), checkpointed with the rest and exported instead of the raw weights.
"""
from __future__ import annotations

import argparse

HELP = "train the CustomShift LoRAs (or, train.mode=base, the base MMDiT) on data from `customshift prepare`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config (see train/configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--distributed", action="store_true",
                   help="join a job of several processes first (jax.distributed: a TPU pod slice or SLURM finds its "
                   "peers; else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): every process runs the "
                   "same command, the mesh spans all of them, each loads its share of the batch")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")


def run(args: argparse.Namespace) -> int:
    from customshift_jax.train.config import load_config
    from customshift_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    if args.distributed:  # before any other JAX call
        from customshift_jax.parallel import distributed

        distributed.initialize()
    return train(cfg, resume=args.resume)
