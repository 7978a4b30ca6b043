"""Encode a training manifest once (VAE latents of reference and target, text embeddings of caption and subject).

Example:
  customshift prepare pairs.jsonl data/prepared --checkpoint ckpt/ --text-encoders sd3-pipeline/ --size 512

MANIFEST: JSONL of {"reference", "target", "caption", "subject"} (paths local or fsspec URLs), images read by
grain worker threads. Unreadable lines or images are skipped with a counted warning; more than
--max-bad-fraction of them stops with an error.
"""
from __future__ import annotations

import argparse

HELP = "encode a manifest of (reference, target, caption, subject) into training shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="JSONL manifest, one {reference, target, caption, subject} a line; relative image paths are read from the manifest's folder")
    p.add_argument("out", help="output folder for the shards and index.json")
    p.add_argument("--checkpoint", required=True, help="our checkpoint or a diffusers pipeline folder (its VAE)")
    p.add_argument("--text-encoders", required=True, help="diffusers pipeline folder holding the text encoders")
    p.add_argument("--size", type=int, default=512, help="training image size in px (square; default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call (default 8)")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard (default 1024)")
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default 256)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="stop when more than this fraction of records is unusable (default 0.05)")
    p.add_argument("--no-flip", action="store_true", help="do not store horizontally flipped latents")
    p.add_argument("--read-threads", type=int, default=4, help="grain threads reading and decoding images (default 4)")


def run(args: argparse.Namespace) -> int:
    from customshift_jax.train.prepare import prepare

    prepare(args.manifest, args.out, checkpoint=args.checkpoint, text_encoders=args.text_encoders, size=args.size,
            batch_size=args.batch_size, shard_size=args.shard_size, flip=not args.no_flip,
            max_sequence_length=args.max_sequence_length, max_bad_fraction=args.max_bad_fraction,
            read_threads=args.read_threads)
    return 0
