"""Generate images with SD3, or with CustomShift when a reference image and its subject name are given.

Examples:
  customshift generate --checkpoint ckpt/ --prompt "a dog on the beach" --out out/
  customshift generate --checkpoint ckpt/ --prompts-file prompts.txt --reference dog.jpg --subject dog
  customshift generate --checkpoint ckpt/ --embeds embeds.npz --init-latents x.npy --save-latents z.npy
  customshift generate --checkpoint ckpt/ --prompt "a dog" --num-images 8 --mesh data=2,fsdp=4 --rules fsdp

CKPT is a checkpoint written by `customshift convert` or a diffusers SD3 pipeline folder. Text encoders
(PyTorch, on the host) come from --text-encoders or the pipeline folder; --embeds skips them. Prompts are encoded
at the T5 length the checkpoint (or --lora) records it was trained with; --max-sequence-length overrides it, with
a one-line note when it differs. The work is
`customshift_jax.CustomShiftPipeline`'s: this command turns flags into its arguments and writes the PNGs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from customshift_jax.io.safe_files import atomic_write, make_dir, refuse_link, write_text

HELP = "generate images (SD3, or CustomShift with --reference/--subject)"

# jax.random.key takes any int64 but, without jax_enable_x64 (as here), keeps only the low 32 bits:
# seeds past 2**32 - 1, and negative ones, would silently repeat another seed's image.
SEED_MAX = 2**32 - 1
CLIP_TOKENS = 77  # SD3's prompt embeddings: 77 CLIP tokens, then --max-sequence-length T5 tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory or a diffusers pipeline folder")
    p.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's and the LoRA files' "
                   "content hashes (default: checked; a damaged piece is refused)")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--prompts-file", help="a file of prompts, one a line (one compile serves them all)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--height", type=int, help="image height in px (default: the model's sample_size x the VAE factor: 1024 for SD3)")
    p.add_argument("--width", type=int, help="image width in px (default: the model's sample_size x the VAE factor: 1024 for SD3)")
    p.add_argument("--steps", "--num-inference-steps", type=int, default=28, help="sampling steps (default 28)")
    p.add_argument("--guidance", "--guidance-scale", type=float, default=7.0,
                   help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--seed", type=int, default=0, help=f"random seed, 0 to {SEED_MAX}: same seed, same image")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--out", help="output folder for the PNGs, created if missing (default: ./out, or ./out-2, "
                   "./out-3, ... when it already holds images: earlier results are never overwritten)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: what the checkpoint "
                   "or --lora records it was trained with, else 256)")
    p.add_argument("--text-encoders", help="a diffusers pipeline folder holding the text encoders (default: the "
                   "--checkpoint's own, when it holds them)")
    p.add_argument("--text-backend", choices=("auto", "torch", "jax"), default="auto",
                   help="run the text encoders in PyTorch on the host or in JAX (default auto: jax when the "
                   "text encoders come from our checkpoint, torch from a diffusers folder)")
    p.add_argument("--text-cache", default=str(Path.home() / ".cache" / "customshift" / "text"),
                   help="folder of cached prompt embeddings: a prompt is encoded once, then read from here; delete it to free the space")
    p.add_argument("--embeds", help=".npz with prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, "
                   "negative_pooled_prompt_embeds (and subject_embeds, subject_pooled_embeds): no text encoders")
    p.add_argument("--init-latents", help=".npy of initial latents (B, C, h, w) instead of seeded noise (C: the "
                   "model's latent channels, 16 for SD3)")
    p.add_argument("--save-latents", help="write the final latents (before decoding) to this .npy")
    p.add_argument("--mesh", help="run the MMDiT sharded on a device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, "
                   "tensor, context; sizes multiply to the device count, one may be -1)")
    p.add_argument("--rules", default="fsdp", help="sharding rule set with --mesh: dp, fsdp, tp, fsdp_tp, context "
                   "(default fsdp)")
    p.add_argument("--attention", choices=("xla", "blocked", "flash"), default="xla",
                   help="attention kernel: xla (default, the reference), blocked (queries in blocks: bounded logits "
                   "memory), flash (the Pallas kernels; interpret mode on CPU: slow, for checking)")
    g = p.add_argument_group("CustomShift")
    g.add_argument("--reference", help="reference image of the subject (JPEG, PNG, ...)")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest --reference file read")
    g.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest --reference width x height decoded")
    g.add_argument("--subject", help="the subject's name, e.g. 'dog'")
    g.add_argument("--gamma", type=float, default=1.0, help="reference strength: larger follows the reference, "
                   "smaller the text, 0 ignores it (default 1)")
    g.add_argument("--shift", choices=["cads", "concat", "joint"], default="cads",
                   help="cads: the attention distribution shift; concat: image queries read the reference unshifted "
                        "(the token-competition baseline); joint: every query, text too (OminiControl-style)")
    g.add_argument("--lora", help="CustomShift LoRA folder (customshift_cgb/rab/beta.safetensors, the PEFT / "
                   "diffusers naming that training exports)")


def check_seed(seed: int) -> None:
    """--seed must be a seed jax.random.key tells apart: 0 .. SEED_MAX (else an OverflowError or an alias)."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"--seed {seed} is out of range: give a whole number from 0 to {SEED_MAX} (2**32 - 1); "
                         "JAX's random key keeps only 32 bits.")


def check_gamma(gamma: float) -> None:
    """--gamma must be finite and >= 0: CADS takes log(gamma), so a negative or NaN one gives NaN images."""
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"--gamma {gamma} is not allowed: give a finite number >= 0 (0 ignores the reference, "
                         "1 is the default, larger follows it more).")


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags, checked before anything loads, so a bad value is one line, not a NaN image."""
    if not math.isfinite(args.guidance):  # NaN would silently turn guidance off (NaN > 1 is False)
        raise ValueError(f"--guidance {args.guidance} is not allowed: give a finite number (<= 1 turns classifier-"
                         "free guidance off; 7 is the default).")
    if args.steps < 1 or args.num_images < 1:
        raise ValueError("--steps and --num-images must be at least 1.")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value <= 0:  # 0 would silently mean "the model's default"
            raise ValueError(f"{flag} {value} is not allowed: give a positive number of pixels, a multiple of the "
                             "VAE scale x patch size (16 for SD3), or leave it out for the model's native size.")
    check_seed(args.seed)
    check_gamma(args.gamma)


def output_folder(out: str | None, cwd: Path | None = None) -> Path:
    """--out as given (refused when it is a file), or the first of ./out, ./out-2, ... holding no PNG yet."""
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the PNGs (it is created if missing).")
        return Path(out)
    cwd = cwd or Path.cwd()
    for i in range(1, 10000):
        folder = cwd / ("out" if i == 1 else f"out-{i}")
        if not folder.exists() or (folder.is_dir() and not any(folder.glob("*.png"))):
            return folder
    raise ValueError("./out, ./out-2, ... ./out-9999 all hold images; give --out FOLDER.")


def check_flag_pairs(args: argparse.Namespace) -> None:
    """The flags that only make sense together: --reference with --subject (unless --embeds holds it), --subject
    and --lora with --reference; one line naming the flag to add or drop."""
    if args.reference is not None and not (args.subject or "").strip() and not args.embeds:
        raise ValueError("--reference needs --subject NAME (the subject's name, e.g. 'dog'); it is empty.")
    if args.subject is not None and not args.subject.strip():
        raise ValueError("--subject is empty; give the subject's name, e.g. 'dog'.")
    if args.subject and args.reference is None:
        raise ValueError("--subject is given without --reference IMAGE.")
    if args.lora and args.reference is None:
        raise ValueError("--lora applies to CustomShift runs: give --reference IMAGE (and --subject NAME) with it, "
                         "or drop --lora.")


def run(args: argparse.Namespace) -> int:
    """Flags -> `CustomShiftPipeline` arguments; each prompt's PNGs (with their settings) written as they come."""
    check_numbers(args)  # before jax is imported: a bad number fails at once
    args.out = str(output_folder(args.out))  # before anything loads: a bad --out fails at once

    from customshift_jax.customshift_pipeline import CustomShiftPipeline, check_widths
    from customshift_jax.io.lora_files import read_lora_files
    from customshift_jax.io.text_settings import stderr_note
    from customshift_jax.pipeline import (check_batch_memory, check_init_latents, check_size, load_embeds_file,
                                         read_prompts)

    check_flag_pairs(args)
    given = args.prompt is not None or args.prompts_file is not None  # an empty --prompt is said to be empty
    prompts = read_prompts(args.prompt, args.prompts_file) if given else None
    if prompts is None and not args.embeds:
        raise ValueError("give --prompt TEXT, --prompts-file FILE, or --embeds FILE.npz.")

    if args.reference is not None and not args.lora:
        print("note: no --lora: the CustomShift branches are untrained (plain shared attention, the training-free "
              "baseline); pass --lora RUN/lora, the folder `customshift train` exports.", file=sys.stderr)
    lora = None
    if args.lora and args.reference:  # damaged / NaN: fails before the weights load
        lora = read_lora_files(args.lora, verify=not args.no_verify, what="--lora")
    limits = ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels)
    pipe = CustomShiftPipeline.from_pretrained(
        args.checkpoint, lora=lora, text_backend=args.text_backend, attention=args.attention, mesh=args.mesh,
        rules=args.rules, text_encoders=args.text_encoders, text_cache=args.text_cache, shift=args.shift,
        verify=not args.no_verify, image_limits=limits, notes=stderr_note)
    if not args.embeds or args.subject:  # the text is encoded here: at the recorded length unless the flag says
        args.max_sequence_length = pipe.max_sequence_length(args.max_sequence_length, "--max-sequence-length")
    config, scale = pipe.config, pipe.vae_scale
    height = args.height if args.height is not None else config.sample_size * scale
    width = args.width if args.width is not None else config.sample_size * scale
    check_size(config, scale, height, width)
    embeds, subject = None, None
    if args.embeds:
        need_subject = args.reference is not None and (pipe.text_folder is None or not args.subject)
        embeds, subject = load_embeds_file(args.embeds, need_subject=need_subject)
        check_widths(config, embeds, subject, args.embeds)
    elif pipe.text_folder is None:
        raise ValueError(f"{args.checkpoint} has no text encoders: pass --text-encoders PIPELINE_FOLDER, or "
                         "precomputed embeddings with --embeds FILE.npz (or convert them into the checkpoint: "
                         "`customshift convert PIPELINE DST --components transformer,vae,text_encoders`).")
    n_prompts = len(prompts) if embeds is None else int(np.shape(embeds.prompt_embeds)[0])
    if prompts is None:
        prompts = [f"(prompt {i} of {args.embeds})" for i in range(n_prompts)]
    if n_prompts != len(prompts):
        raise ValueError(f"--embeds holds {n_prompts} prompts but {len(prompts)} were given.")
    tokens = int(np.shape(embeds.prompt_embeds)[1]) if embeds is not None else CLIP_TOKENS + args.max_sequence_length
    check_batch_memory(config, scale, height, width, args.num_images, text_tokens=tokens)
    if embeds is not None and args.guidance > 1 and not embeds.has_negative:
        raise ValueError("guidance > 1 needs negative embeddings; the --embeds file has none (or use "
                         "--guidance 1).")
    init = None
    if args.init_latents:
        init = read_init_latents(args.init_latents)
        shape = (n_prompts * args.num_images, config.in_channels, height // scale, width // scale)
        check_init_latents(init, shape, f"--init-latents {args.init_latents}")

    results = pipe.each_prompt(
        None if embeds is not None else prompts, reference=args.reference,
        subject=args.subject if args.reference and subject is None else None, subject_embeds=subject,
        negative_prompt=None if embeds is not None else args.negative_prompt, num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps, guidance_scale=args.guidance, gamma=args.gamma, height=height, width=width,
        seed=args.seed, prompt_embeds=embeds, latents=init, max_sequence_length=args.max_sequence_length)
    latents_path = None
    if args.save_latents:
        latents_path = args.save_latents + ("" if args.save_latents.endswith(".npy") else ".npy")  # as np.save
    check_outputs(Path(args.out), n_prompts, args.num_images, latents_path)  # a refused run writes nothing
    out = make_dir(args.out, "--out")
    finals = []
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}  # no internal entries
    per_png = png_settings(args, height, width)
    try:
        for result in results:
            write_prompt_pngs(out, result, prompts[result.index], per_png)
            finals.append(result.latents)
    except KeyboardInterrupt:
        if pipe.progress is not None:
            pipe.progress.close()  # the bar's line cleared: "interrupted" starts its own line
        settings["interrupted"] = f"by Ctrl-C after {len(finals)} of {n_prompts} prompts (the PNGs here)"
        write_text(out / "settings.json", json.dumps(settings, indent=1, default=str), what="settings")
        raise KeyboardInterrupt(f"{len(finals)} of {n_prompts} prompts finished, in {out} (see settings.json)") \
            from None
    if latents_path:
        with atomic_write(latents_path, what="--save-latents") as fh:
            np.save(fh, np.concatenate(finals, axis=0))
        print(f"final latents -> {latents_path}")
    write_text(out / "settings.json", json.dumps(settings, indent=1, default=str), what="settings")
    return 0


def read_init_latents(path: str) -> np.ndarray:
    """--init-latents as float32: a regular .npy file (no FIFO or device, no pickle), or one line naming it."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"--init-latents {path}: no such file.") from None
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device"
        raise ValueError(f"--init-latents {path} is a {kind}, not a regular file; give a .npy file.")
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--init-latents {path} cannot be read as a .npy array ({' '.join(str(e).split())}); "
                         "give the file np.save wrote.") from None


def check_outputs(out: Path, n_prompts: int, num_images: int, latents_path: str | None) -> None:
    """Every path this run writes, checked before the first is written: a planted link refuses the run with
    --out left as it was, not after some PNGs."""
    refuse_link(out / "settings.json", "settings")
    if latents_path:
        refuse_link(latents_path, "--save-latents")
    for i in range(n_prompts):
        for j in range(num_images):
            refuse_link(out / f"{i:03d}_{j:02d}.png", "image")


def png_settings(args: argparse.Namespace, height: int, width: int) -> dict:
    """The run's settings that every PNG records in its text chunks (the prompt and index are added per image)."""
    return dict(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                height=height, width=width, checkpoint=str(args.checkpoint), reference=args.reference,
                subject=args.subject, gamma=args.gamma if args.reference else None,
                shift=args.shift if args.reference else None, lora=args.lora, mesh=args.mesh,
                rules=args.rules if args.mesh else None, init_latents=args.init_latents, attention=args.attention)


def write_prompt_pngs(out: Path, result: Any, prompt: str, settings: dict) -> None:
    """One prompt's PNGs (`result.images`), each with its prompt, index and the run's `settings` in its text
    chunks; prints each path."""
    from customshift_jax.pipeline import save_png

    for j, image in enumerate(result.images):
        path = out / f"{result.index:03d}_{j:02d}.png"
        save_png(image, path, {"prompt": prompt, **settings, "index": j})
        print(path)
