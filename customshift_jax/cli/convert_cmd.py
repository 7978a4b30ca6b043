"""Convert PyTorch weights into a customshift (orbax) checkpoint directory.

SRC is a diffusers pipeline folder, one diffusers component folder (transformer/ or vae/), or an original
single-file SD3 / SD3.5 .safetensors (model.diffusion_model.* and first_stage_model.* tensors; text
encoders in it are skipped; --components text_encoders stores a pipeline folder's three encoders and tokenizers,
which `generate` then runs in JAX). A single file carries no config: it is inferred from the tensor shapes
unless --config names the diffusers config.json (or a folder holding transformer/ and vae/ configs).

Every key and shape is checked before anything is written; a mismatch lists the missing, unexpected and
mis-shaped keys. DST appears only when complete; an existing DST is kept unless --overwrite, which
replaces it once the new checkpoint is complete (refused when DST holds files convert did not write). Ctrl-C /
SIGTERM remove the partial DST; the .DST.partial-* folder of a killed run is removed by the next run. Each params
piece's sha256 goes into the checkpoint's marker and is checked when it loads. Read it back with customshift_jax.load_transformer,
customshift_jax.io.checkpoint.load_checkpoint, or `customshift export` for diffusers.

examples:
  customshift convert ~/sd3-medium-diffusers ckpt/sd3-medium --dtype bf16
  customshift convert sd3.5_medium.safetensors ckpt/sd35m --components transformer
  customshift convert tiny.safetensors ckpt/tiny --config tiny-pipeline/
"""
from __future__ import annotations

import argparse
import time

HELP = "convert diffusers / original SD3 weights into a customshift orbax checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="diffusers pipeline or component folder, or an original .safetensors")
    p.add_argument("dst", metavar="DST", help="the checkpoint directory to write (must not exist, unless --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the stored params (default fp32; bf16 rounds to nearest even like torch)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated components to convert: transformer,vae,text_encoders (default: the "
                        "transformer and VAE that SRC holds; text_encoders: the three encoders and tokenizers of a "
                        "pipeline folder, for the JAX text backend)")
    p.add_argument("--config", action="append", default=[], metavar="CONFIG.json",
                   help="for a single file: a diffusers config.json, or a folder with transformer/ and vae/ "
                        "config.json, instead of inferring the architecture (may be repeated)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST checkpoint, once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="record that the model was trained with prompts of N T5 tokens: generate, encode and prepare "
                   "then use N by default (default: record nothing; they use 256)")


def run(args: argparse.Namespace) -> int:
    from customshift_jax.io.convert import CONVERTERS, convert

    text = None
    if args.max_sequence_length is not None:
        if not 1 <= args.max_sequence_length <= 512:
            raise ValueError(f"--max-sequence-length {args.max_sequence_length}: give a whole number from 1 to 512 "
                             "(T5 tokens).")
        from customshift_jax.io.text_settings import TextSettings

        text = TextSettings(args.max_sequence_length).to_json()
    quiet_orbax()
    start = time.perf_counter()
    dst, plan = convert(args.src, args.dst, dtype=args.dtype, components=args.components, config_paths=args.config,
                        overwrite=args.overwrite, progress=not args.no_progress, text_settings=text)
    print(f"wrote {dst} ({args.dtype}) from the {plan.kind} {plan.src} in {time.perf_counter() - start:.1f} s:")
    for s in plan.sources:
        print(f"  {s.name}: {CONVERTERS[s.name].describe(s.config)}; {len(s.tensors)} tensors, "
              f"{s.nbytes / 1e6:.1f} MB read; config {s.config_origin}")
    for t in plan.text:
        print(f"  {t.name}: {t.config.get('model_type')} ({', '.join(t.config.get('architectures') or [])}); "
              f"{t.tensors} tensors, {t.nbytes / 1e6:.1f} MB read")
    if plan.tokenizers:
        print(f"  copied {', '.join(plan.tokenizers)}")
    return 0


def quiet_orbax() -> None:
    """Keep orbax/absl INFO and WARNING chatter off the terminal of a CLI run."""
    import logging

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)
