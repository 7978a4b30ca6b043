"""Encode prompts (and a subject's name) with the SD3 text encoders into an .npz that `customshift generate
--embeds` and training samples (`sample.embeds`) read, so that later runs need no text encoder.

The file holds prompt_embeds, pooled_prompt_embeds, the negatives (of --negative-prompt, for CFG) and, with
--subject, subject_embeds and subject_pooled_embeds.
Prompts are encoded at the T5 length the --text-encoders checkpoint (or --lora) records its model was trained
with, else 256; --max-sequence-length overrides it, with a one-line note when it differs.

example:
  customshift encode --text-encoders /models/sd3-medium --prompts-file prompts.txt --subject dog --out dog.npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "encode prompts with the SD3 text encoders into an --embeds .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-encoders", required=True, metavar="DIR",
                   help="a diffusers SD3 pipeline folder holding the text encoders and tokenizers, or our "
                   "checkpoint holding them (`customshift convert --components text_encoders`)")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts-file", help="a file of prompts, one a line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", default="", help="the negative prompt of every prompt (CFG)")
    p.add_argument("--subject", help="the subject's name, e.g. 'dog' (adds subject_embeds for CustomShift)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: what the --text-encoders "
                   "checkpoint, or --lora, records its model was trained with, else 256)")
    p.add_argument("--lora", metavar="DIR", help="the CustomShift LoRA folder the embeddings are for: its "
                   "recorded text settings win over the checkpoint's")
    p.add_argument("--text-backend", choices=("auto", "torch", "jax"), default="auto",
                   help="run the text encoders in PyTorch on the host or in JAX (default auto: jax when the "
                   "text encoders come from our checkpoint, torch from a diffusers folder)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="the file to write (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: give a file name ending in .npz.")
    if out.exists() and (out.is_dir() or not args.overwrite):
        raise ValueError(f"--out {out} exists; choose another name" + ("." if out.is_dir() else " or pass --overwrite."))
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist.")
    if args.subject is not None and not args.subject.strip():
        raise ValueError("--subject is empty; give the subject's name, e.g. 'dog'.")
    from customshift_jax.pipeline import read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file)
    folder = Path(args.text_encoders)
    if not (folder / "text_encoder").is_dir():
        raise FileNotFoundError(f"--text-encoders {folder}: no text_encoder/ folder; give a diffusers SD3 pipeline "
                                "folder or our checkpoint holding the text encoders.")
    import numpy as np

    if args.lora and not Path(args.lora).exists():
        raise FileNotFoundError(f"--lora {args.lora}: no such LoRA folder.")
    from customshift_jax.io import text_settings as ts
    from customshift_jax.text import load_text_encoders
    from customshift_jax.text.encode import _atomic_savez

    recorded = ts.combine(ts.checkpoint_text_settings(folder),
                          ts.lora_text_settings(args.lora) if args.lora else None, ts.stderr_note)
    length = ts.resolve_max_sequence_length(args.max_sequence_length, recorded, ts.stderr_note)
    clip_skip = ts.recorded_clip_skip(recorded)
    encoders = load_text_encoders(folder, backend=args.text_backend)
    embeds = encoders.encode(prompts, [args.negative_prompt] * len(prompts), max_sequence_length=length,
                             do_classifier_free_guidance=True, clip_skip=clip_skip)
    arrays = dict(embeds.arrays())
    if args.subject:
        s = encoders.encode([args.subject], max_sequence_length=length, do_classifier_free_guidance=False,
                            clip_skip=clip_skip)
        arrays.update(subject_embeds=np.asarray(s.prompt_embeds), subject_pooled_embeds=np.asarray(s.pooled_prompt_embeds))
    _atomic_savez(out, arrays)
    shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in arrays.items())
    print(f"wrote {out}: {len(prompts)} prompt(s); {shapes}")
    return 0
