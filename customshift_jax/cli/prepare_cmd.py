"""Encode a training manifest once (VAE latents of reference and target, text embeddings of caption and subject).

Example:
  customshift prepare pairs.jsonl data/prepared --checkpoint ckpt/ --text-encoders sd3-pipeline/ --size 512

MANIFEST: JSONL of {"reference", "target", "caption", "subject"} (paths local or fsspec URLs), images read by
grain worker threads. Unreadable lines or images are skipped with a counted warning; more than
--max-bad-fraction of them stops with an error. Images are read only from regular files within
--max-image-bytes and --max-image-pixels; repeated lines are dropped and non-UTF-8 lines kept, both counted.
OUT must be new or empty, or an unfinished prepare of the same manifest: run the same command again and it keeps
the shards already finished and encodes the rest (with other settings, everything is redone). Pairs are encoded
and written a batch at a time (memory holds one batch); a stop for bad data keeps no shard.

On accelerators: --text-backend jax runs CLIP and T5 in JAX; --mesh shards them (and splits the VAE batch) over
this process's devices, e.g. T5-XXL with --mesh fsdp=8 on one 8-chip host. A job of several processes (a TPU pod
slice, a GPU cluster): give every process the same command with --distributed; each encodes its share of the
records on its own devices and process 0 writes one index, in the manifest's order (OUT on a shared filesystem).
  JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$RANK \\
  customshift prepare pairs.jsonl /mnt/disks/data/prepared --checkpoint ckpt/ --text-encoders ckpt/ \\
      --text-backend jax --mesh fsdp=-1 --distributed

--format subjects200k: MANIFEST is a local folder of Subjects200K's parquet shards (as downloaded from the hub),
streamed file by file: each composite is split into its left and right views, the item is the subject name,
rows are filtered by quality scores, description_valid and --collections, and filtered rows are counted.
  customshift prepare Subjects200K/ data/s200k --format subjects200k --checkpoint ckpt/ --text-encoders sd3/

--format folders: MANIFEST is a folder of subject folders of images (DreamBench's layout, dreambench/dog/00.jpg),
or one such subject folder: each image is paired as the reference of the next image of its subject, captioned
"a photo of a <subject>" (the folder's name).
  customshift prepare dreambench/ data/dreambench --format folders --checkpoint ckpt/ --text-encoders sd3/
"""
from __future__ import annotations

import argparse

from customshift_jax.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits

HELP = "encode a manifest of (reference, target, caption, subject) into training shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="JSONL manifest, one {reference, target, caption, subject} a line; relative image paths are read from the manifest's folder")
    p.add_argument("out", help="output folder for the shards and index.json")
    p.add_argument("--checkpoint", required=True, help="our checkpoint or a diffusers pipeline folder (its VAE)")
    p.add_argument("--text-encoders", required=True, help="diffusers pipeline folder holding the text encoders")
    p.add_argument("--size", type=int, default=512, help="training image size in px (square; default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call (default 8)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="manifest records (Subjects200K rows) per shard: a shard holds their usable pairs, and a rerun "
                        "after an interruption resumes at the first unfinished shard (default 1024)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: what the --checkpoint "
                   "(or the --text-encoders checkpoint) records its model was trained with, else 256)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="stop when more than this fraction of records is unusable (default 0.05)")
    p.add_argument("--no-flip", action="store_true", help="do not store horizontally flipped latents")
    p.add_argument("--read-threads", type=int, default=4, help="grain threads reading and decoding images (default 4)")
    p.add_argument("--text-backend", choices=("auto", "torch", "jax"), default="auto",
                   help="run the text encoders in PyTorch on the host or in JAX (default auto: jax when the "
                   "text encoders come from our checkpoint, torch from a diffusers folder)")
    p.add_argument("--mesh", help="shard the JAX text encoders and split the VAE batch over this process's devices, "
                   "e.g. fsdp=8 or fsdp=4,tensor=2 (one size may be -1: the rest); needs --text-backend jax or auto")
    p.add_argument("--rules", default="fsdp", help="sharding rule set with --mesh: dp, fsdp, tp, fsdp_tp")
    p.add_argument("--distributed", action="store_true",
                   help="join a job of several processes (jax.distributed: JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a TPU pod's or SLURM's own); each encodes its share")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar when stderr is a terminal, else a line every 30 s)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="largest image file read; a larger one is skipped and counted")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest width x height decoded; a larger image is skipped and counted")
    p.add_argument("--format", choices=("jsonl", "subjects200k", "folders"), default="jsonl",
                   help="MANIFEST is a JSONL manifest, a folder of Subjects200K parquet shards, or a folder of "
                        "subject folders of images (pairs within each subject)")
    s = p.add_argument_group("--format subjects200k")
    s.add_argument("--min-quality", type=int, default=None,
                   help="keep rows whose three quality scores are all >= this, 0-5 (default 5, as the dataset card "
                        "and OminiControl filter; 0 keeps every row)")
    s.add_argument("--collections", default=None,
                   help="comma-separated collections to keep, e.g. collection_2 (default: all)")
    s.add_argument("--keep-invalid-descriptions", action="store_true",
                   help="keep rows whose description_valid is false (default: dropped)")
    s.add_argument("--directions", choices=("both", "left-to-right"), default=None,
                   help="both (default): each row gives (left -> right, description_1) and (right -> left, "
                        "description_0), as OminiControl trains; left-to-right: only the first")
    s.add_argument("--padding", type=int, default=None,
                   help="px around the two views in each composite (default 8: 512-px views in 1056x528)")


# flag -> (attribute, lowest value, highest value or None): checked before anything is read or loaded
NUMBERS = {
    "--size": ("size", 1, None), "--batch-size": ("batch_size", 1, None), "--shard-size": ("shard_size", 1, None),
    "--max-sequence-length": ("max_sequence_length", 1, None), "--max-bad-fraction": ("max_bad_fraction", 0, 1),
    "--read-threads": ("read_threads", 1, None), "--max-image-bytes": ("max_image_bytes", 1, None),
    "--max-image-pixels": ("max_image_pixels", 1, None), "--min-quality": ("min_quality", 0, 5),
    "--padding": ("padding", 0, None),
}


def check_numbers(args: argparse.Namespace) -> None:
    """Every number flag in its range (NaN included), one line naming the flag."""
    import math

    for flag, (attr, low, high) in NUMBERS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ValueError(f"{flag} {value}: expected a number {span}.")


def _subjects200k_options(args: argparse.Namespace):
    """The Subjects200K filters from the flags; with --format jsonl, any of them set is refused."""
    from customshift_jax.train.subjects200k import Subjects200KOptions

    given = {"--min-quality": args.min_quality, "--collections": args.collections, "--directions": args.directions,
             "--padding": args.padding, "--keep-invalid-descriptions": args.keep_invalid_descriptions or None}
    if args.format != "subjects200k":
        used = [k for k, v in given.items() if v is not None]
        if used:
            raise ValueError(f"{', '.join(used)} apply to --format subjects200k only (this run reads --format "
                             f"{args.format}).")
        return None
    defaults = Subjects200KOptions()
    collections = tuple(c.strip() for c in args.collections.split(",") if c.strip()) if args.collections else None
    return Subjects200KOptions(
        min_quality=defaults.min_quality if args.min_quality is None else args.min_quality,
        collections=() if args.collections is not None and not collections else collections,
        keep_invalid_descriptions=args.keep_invalid_descriptions,
        directions=args.directions or defaults.directions,
        padding=defaults.padding if args.padding is None else args.padding)


def _local_mesh(args: argparse.Namespace):
    """The mesh of --mesh over this process's devices (checked with --rules), or None without it."""
    if not args.mesh:
        return None
    import jax

    from customshift_jax.parallel import sharding as shd

    shd.as_rules(args.rules)  # an unknown rule set fails here, naming the known ones
    return shd.make_mesh(**shd.parse_mesh(args.mesh), devices=jax.local_devices())


def _max_sequence_length(args: argparse.Namespace) -> int:
    """--max-sequence-length, else what the --checkpoint (or the --text-encoders checkpoint) records, else 256; a
    flag that differs from the record is said in one line (the data would not match the model)."""
    from customshift_jax.io import text_settings as ts

    recorded = ts.checkpoint_text_settings(args.checkpoint) or ts.checkpoint_text_settings(args.text_encoders)
    return ts.resolve_max_sequence_length(args.max_sequence_length, recorded, ts.stderr_note)


def run(args: argparse.Namespace) -> int:
    check_numbers(args)  # before joining a job: a bad flag does not wait for the other processes
    if args.distributed:  # before any other JAX call
        from customshift_jax.parallel import distributed

        distributed.initialize()
    from customshift_jax.train.prepare import prepare

    subjects200k = _subjects200k_options(args)
    length = _max_sequence_length(args)
    mesh = _local_mesh(args)
    prepare(args.manifest, args.out, checkpoint=args.checkpoint, text_encoders=args.text_encoders, size=args.size,
            batch_size=args.batch_size, shard_size=args.shard_size, flip=not args.no_flip,
            max_sequence_length=length, max_bad_fraction=args.max_bad_fraction,
            read_threads=args.read_threads,
            limits=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels),
            format=args.format, subjects200k=subjects200k, text_backend=args.text_backend, mesh=mesh,
            rules=args.rules, progress=False if args.no_progress else None)
    return 0
