"""Benchmark `customshift convert` on a synthetic SD3-medium checkpoint: peak resident memory and time.

Writes random tensors with the real sd3-medium shapes (MMDiT 2.03B params + the SD3 VAE) into a temporary
directory, in the original single-file layout (`model.diffusion_model.*`, `first_stage_model.*`) or as a
diffusers pipeline folder, then runs `customshift convert` in a child process and reports its peak RSS
(from wait4) against the budget 1.5 S + 1 GB, S being the checkpoint's size in bytes. Nothing is kept
unless --keep. Example (bf16 source, 4.2 GB):

    python bench/convert.py --source single-file --src-dtype bf16 --dtype bf16 --load
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named convert.py: keep its folder from shadowing the `convert` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

GB = 1 << 30
SRC_DTYPES = {"bf16": (np.dtype(ml_dtypes.bfloat16), "BF16"), "fp16": (np.dtype(np.float16), "F16"),
              "fp32": (np.dtype(np.float32), "F32")}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, seed: int) -> int:
    """Stream random N(0, 0.02) tensors of `shapes` into a safetensors file, one tensor in memory at a time."""
    np_dtype, code = SRC_DTYPES[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for shape in shapes.values():
            values = rng.standard_normal(int(np.prod(shape, dtype=np.int64)), dtype=np.float32)
            values *= 0.02
            f.write(values.astype(np_dtype).tobytes())
    return path.stat().st_size


def make_single_file(root: Path, dtype: str) -> Path:
    """An original-layout sd3-medium file: MMDiT + VAE under their Stability prefixes."""
    from customshift_jax.io.single_file import TRANSFORMER_PREFIX, VAE_PREFIX, transformer_layout, vae_layout
    from customshift_jax.models.mmdit.config import get_preset
    from customshift_jax.models.vae import VAEConfig

    shapes = {TRANSFORMER_PREFIX + k: t.shape for k, t in transformer_layout(get_preset("sd3-medium")).items()}
    shapes.update({VAE_PREFIX + k: t.shape for k, t in vae_layout(VAEConfig.sd3()).items()})
    path = root / "sd3_medium_synthetic.safetensors"
    write_random_safetensors(path, shapes, dtype, seed=0)
    return path


def make_diffusers_folder(root: Path, dtype: str) -> Path:
    """A diffusers pipeline folder (transformer/ + vae/) with the sd3-medium shapes."""
    from customshift_jax.io.checkpoint import config_dict
    from customshift_jax.io.single_file import vae_state_dict_shapes
    from customshift_jax.models.mmdit.config import get_preset
    from customshift_jax.models.mmdit.mapping import state_dict_shapes
    from customshift_jax.models.vae import VAEConfig

    pipe = root / "sd3_medium_synthetic"
    for name, config, shapes in (("transformer", get_preset("sd3-medium"), state_dict_shapes),
                                 ("vae", VAEConfig.sd3(), vae_state_dict_shapes)):
        (pipe / name).mkdir(parents=True)
        (pipe / name / "config.json").write_text(json.dumps(config_dict(name, config)))
        write_random_safetensors(pipe / name / "diffusion_pytorch_model.safetensors", shapes(config), dtype, seed=1)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return pipe


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_child(argv: list[str]) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


LOAD_CHECK = """
import sys, time, numpy as np
from customshift_jax.io.checkpoint import iter_leaves, load_checkpoint
from customshift_jax.io.integrity import leaves_hash
out = load_checkpoint(sys.argv[1], verify=sys.argv[2] == "verify")
print("loaded", {k: sum(a.size for a in __import__("jax").tree_util.tree_leaves(p)) for k, (c, p) in out.items()})
if sys.argv[2] == "verify":
    start = time.perf_counter()
    nbytes = sum(leaf.nbytes for _, (_, p) in out.items() for _, leaf in iter_leaves(p))
    for _, (_, p) in out.items():
        leaves_hash(iter_leaves(p))
    seconds = time.perf_counter() - start
    print(f"hashing alone (sha256, the work verification adds to a load and the writer adds to a convert): "
          f"{seconds:.1f} s for {nbytes / 2**30:.2f} GiB ({nbytes / seconds / 1e9:.2f} GB/s)")
"""


NO_HASH_CONVERT = """
import sys
import customshift_jax.io.checkpoint as checkpoint
checkpoint.leaves_hash = lambda leaves: "unhashed"  # the baseline: the same convert without the content hashes
from customshift_jax.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("single-file", "diffusers"), default="single-file")
    p.add_argument("--src-dtype", choices=tuple(SRC_DTYPES), default="bf16",
                   help="dtype of the synthetic checkpoint (bf16: 4.2 GB, fp32: 8.5 GB)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="--dtype of the conversion")
    p.add_argument("--workdir", default=None, help="where to make the temporary directory (default: system temp)")
    p.add_argument("--load", action="store_true", help="also time load_checkpoint in a child process")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--hash-baseline", action="store_true",
                   help="also time the same convert with the content hashing stubbed out (the cost of hashing)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        start = time.perf_counter()
        src = (make_single_file if args.source == "single-file" else make_diffusers_folder)(root, args.src_dtype)
        s = size_of(src)
        print(f"synthetic sd3-medium ({args.source}, {args.src_dtype}): {src} S = {s / GB:.2f} GiB "
              f"({s} bytes), made in {time.perf_counter() - start:.0f} s", flush=True)
        dst = root / "ckpt"
        argv = [sys.executable, "-m", "customshift_jax.cli.main", "convert", str(src), str(dst), "--dtype", args.dtype]
        code, seconds, peak = run_child(argv)
        if code != 0:
            print(f"convert failed with exit status {code}")
            return 1
        budget = 1.5 * s + GB
        out_size = size_of(dst)
        print(f"convert --dtype {args.dtype}: {seconds:.1f} s ({s / seconds / 1e6:.0f} MB/s read), peak RSS "
              f"{peak / GB:.2f} GiB, budget 1.5 S + 1 GiB = {budget / GB:.2f} GiB -> "
              f"{'PASS' if peak < budget else 'OVER BUDGET'} (peak / S = {peak / s:.2f}); "
              f"checkpoint {out_size / GB:.2f} GiB")
        if args.hash_baseline:
            code, base, _ = run_child([sys.executable, "-c", NO_HASH_CONVERT, *argv[3:-3], str(root / "unhashed"),
                                       "--dtype", args.dtype])
            print(f"convert without content hashes: {base:.1f} s -> hashing adds {seconds - base:+.1f} s "
                  f"({(seconds - base) / base:+.0%}){'' if code == 0 else f', FAILED ({code})'}")
            shutil.rmtree(root / "unhashed", ignore_errors=True)
        if args.load:
            for mode in ("no-verify", "verify", "no-verify"):  # --no-verify, hashes checked (default); the first is cold
                code, seconds, peak = run_child([sys.executable, "-c", LOAD_CHECK, str(dst), mode])
                print(f"load_checkpoint ({mode}): {seconds:.1f} s, peak RSS {peak / GB:.2f} GiB "
                      f"(checkpoint {out_size / GB:.2f} GiB){'' if code == 0 else f', FAILED ({code})'}")
        return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
