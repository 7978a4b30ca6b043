"""Export a customshift (orbax) checkpoint as diffusers folders.

Writes DST/<component>/config.json and diffusion_pytorch_model.safetensors for each component, which
SD3Transformer2DModel.from_pretrained(DST, subfolder="transformer") and AutoencoderKL.from_pretrained(DST,
subfolder="vae") load. With both, DST is a whole pipeline folder (model_index.json, scheduler/, and the text
encoders and tokenizers: SRC's own when it holds them, written as transformers folders, or copied from
--text-encoders): StableDiffusion3Pipeline.from_pretrained(DST) loads it
in one call. --lora copies a trained CustomShift LoRA into DST/lora/. fp32 params export bit for bit. DST
appears only when complete.

example:
  customshift export ckpt/sd3-medium out/sd3-medium-diffusers --text-encoders /models/sd3-medium
"""
from __future__ import annotations

import argparse

HELP = "export a customshift checkpoint as diffusers folders (safetensors + config.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a checkpoint directory written by `customshift convert`")
    p.add_argument("dst", metavar="DST", help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="comma-separated components to export (default: all in SRC)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="cast on export (default: as stored)")
    p.add_argument("--text-encoders", metavar="DIR", default=None,
                   help="a diffusers SD3 pipeline folder whose text encoders and tokenizers are copied into DST "
                   "(default: the checkpoint's own, written as transformers folders, when it holds them; else none, "
                   "listed as null in model_index.json)")
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="a CustomShift LoRA folder (customshift_*.safetensors) copied to DST/lora/ (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at DST, once the new one is complete (refused when DST holds "
                   "files the export did not write)")
    p.add_argument("--no-verify", action="store_true", help="skip checking SRC's and the LoRA files' content hashes "
                   "(default: checked; a damaged piece is refused)")


def run(args: argparse.Namespace) -> int:
    from customshift_jax.cli.convert_cmd import quiet_orbax
    from customshift_jax.io.export import export

    quiet_orbax()
    dst = export(args.src, args.dst, components=args.components, dtype=args.dtype, overwrite=args.overwrite,
                 text_encoders=args.text_encoders, lora=args.lora, verify=not args.no_verify)
    parts = sorted(p.name for p in dst.iterdir() if (p / "config.json").is_file())
    print(f"wrote {dst}: {', '.join(f'{p}/' for p in parts)} (diffusers from_pretrained(..., subfolder=NAME))")
    return 0
