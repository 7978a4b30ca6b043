"""Text encoders, JAX vs PyTorch on this CPU: prompts per second at real widths (CLIP-L 768, bigG 1280, T5-XXL 4096
with 64 heads and d_ff 10240) with few layers, the JAX compile time, and the compiler's per-device bytes of the
full T5-XXL (24 layers) on an fsdp=8 CPU mesh (abstract params: nothing of that size is allocated).

The tokenizers are the tiny pipeline's (no hub here); the encoders are random transformers models of real width.
  python bench/text.py --layers 2 --prompts 1000 --max-sequence-length 77   (about an hour on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def build_folder(root: Path, layers: int) -> Path:
    """The tiny pipeline (for its tokenizers) with text_encoder{,_2,_3}/ replaced by real-width random models."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from customshift_jax.testing import build_tiny_pipeline
    from customshift_jax.models.text_encoders.config import read_config

    folder = build_tiny_pipeline(root / "pipe", transformer_config={"joint_attention_dim": 96})
    torch.manual_seed(0)
    for name, width, heads, act in (("text_encoder", 768, 12, "quick_gelu"), ("text_encoder_2", 1280, 20, "gelu")):
        tiny = json.loads((folder / name / "config.json").read_text())
        ids = {k: tiny[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        cfg = CLIPTextConfig(**ids, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
                             num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act,
                             max_position_embeddings=77)
        CLIPTextModelWithProjection(cfg).save_pretrained(folder / name)
    tiny = read_config(folder / "text_encoder_3")
    t5 = T5Config(vocab_size=tiny.vocab_size, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(t5).save_pretrained(folder / "text_encoder_3")
    return folder


def prompts_file(path: Path, n: int) -> list[str]:
    """A prompts file of n lines (DreamBench-style sentences with a line number), read back."""
    from customshift_jax.testing.tiny_pipeline import training_sentences

    base = training_sentences()
    path.write_text("".join(f"{base[i % len(base)]}, take {i}\n" for i in range(n)))
    return path.read_text().splitlines()


def side_by_side(backends: dict, prompts: list[str], batch: int, length: int, log=print) -> dict[str, dict]:
    """Each backend's compile time (its first call minus a second call of the same batch) and prompts per second
    over `prompts`, the backends taking turns batch by batch (so a load on the machine slows both alike), and the
    largest relative error of each backend's embeddings against the first's."""
    import numpy as np

    from customshift_jax.numerics import relative_error

    result = {name: {"seconds": 0.0, "max_rel_err": 0.0} for name in backends}
    for name, enc in backends.items():
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            enc.encode_batch(prompts[:batch], max_sequence_length=length)
            times.append(time.perf_counter() - t0)
        result[name]["compile_s"] = times[0] - times[1]
    first = next(iter(backends))
    for k, i in enumerate(range(0, len(prompts), batch)):
        outs = {}
        for name, enc in backends.items():
            t0 = time.perf_counter()
            outs[name] = enc.encode_batch(prompts[i:i + batch], max_sequence_length=length)
            result[name]["seconds"] += time.perf_counter() - t0
        for name, out in outs.items():
            err = max(relative_error(np.asarray(a), np.asarray(b)) for a, b in zip(out, outs[first]))
            result[name]["max_rel_err"] = max(result[name]["max_rel_err"], err)
        if log and (k + 1) % 8 == 0:
            log(f"  {i + batch}/{len(prompts)} prompts: " + ", ".join(
                f"{n} {i + batch} in {r['seconds']:.0f}s" for n, r in result.items()))
    for r in result.values():
        r["prompts_per_s"] = len(prompts) / r["seconds"]
    return result


def t5_xxl_memory(batch: int, length: int, dtype: str) -> dict[str, int]:
    """The compiled T5-XXL encode's per-device bytes on fsdp=8 (memory_analysis), from abstract params."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from customshift_jax.parallel.sharding import activation_hook, make_mesh, param_shardings
    from customshift_jax.models.text_encoders.api import abstract_encoder_params, build_encoder
    from customshift_jax.models.text_encoders.axes import text_logical_axes
    from customshift_jax.models.text_encoders.config import T5Config

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    mesh = make_mesh(fsdp=8)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), abstract_encoder_params(config))
    shardings = param_shardings(abstract, mesh, "fsdp", text_logical_axes)
    ids_sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    model = build_encoder(config, dt, activation_hook(mesh, "fsdp"))
    fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids), in_shardings=(shardings, ids_sharding))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = fn.lower(abstract, jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()
        seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes, "compile_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="layers of each encoder (real: 12 / 32 / 24)")
    ap.add_argument("--prompts", type=int, default=1000, help="lines of the prompts file")
    ap.add_argument("--limit", type=int, default=None, help="time only the first N prompts of the file (default: all)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per encode call (one JAX bucket)")
    ap.add_argument("--max-sequence-length", type=int, default=77, help="T5 tokens")
    ap.add_argument("--memory-batch", type=int, default=8, help="batch of the full T5-XXL memory figure")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()

    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(os.cpu_count() or 1)
    from customshift_jax.text import TextEncoders
    from customshift_jax.text.jax import JaxTextEncoders

    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_folder(Path(tmp), args.layers)
            prompts = prompts_file(Path(tmp) / "prompts.txt", args.prompts)[:args.limit]
            print(f"{len(prompts)} of a {args.prompts}-line prompts file, batch {args.batch}, T5 length "
                  f"{args.max_sequence_length}, {args.layers} layers per encoder at real width, fp32, "
                  f"{os.cpu_count()} CPUs")
            t0 = time.perf_counter()
            jax_enc = JaxTextEncoders.from_pretrained(folder, batch_buckets=(args.batch,))
            load = {"jax": time.perf_counter() - t0}
            t0 = time.perf_counter()
            torch_enc = TextEncoders.from_pretrained(folder)
            load["torch"] = time.perf_counter() - t0
            rows = side_by_side({"torch": torch_enc, "jax": jax_enc}, prompts, args.batch, args.max_sequence_length,
                                log=lambda m: print(m, flush=True))
            print(f"{'backend':<8} {'prompts/s':>10} {'compile s':>10} {'load s':>7} {'rel err vs torch':>17}")
            for name in ("jax", "torch"):
                r = rows[name]
                compile_s = f"{r['compile_s']:.2f}" if name == "jax" else "-"
                print(f"{name:<8} {r['prompts_per_s']:>10.3f} {compile_s:>10} {load[name]:>7.1f} "
                      f"{r['max_rel_err']:>17.2e}")
            print("(compile: the first call minus the second; the backends take turns batch by batch)", flush=True)
    print(f"\nfull T5-XXL (24 layers, vocab 32128) on fsdp=8, batch {args.memory_batch} x 256 tokens, per device:")
    print(f"{'dtype':<9} {'arguments':>14} {'outputs':>12} {'temporaries':>14} {'compile s':>10}")
    for dtype in ("float32", "bfloat16"):
        m = t5_xxl_memory(args.memory_batch, 256, dtype)
        print(f"{dtype:<9} {m['arguments']:>14,} {m['outputs']:>12,} {m['temporaries']:>14,} {m['compile_s']:>10.1f}")
    print("(bf16 temporaries on CPU: XLA's CPU backend runs bf16 matmuls in fp32 and converts each layer's weight\n"
          " shard to fp32 once, outside the scanned layer loop: about 96 MB a layer here; GPUs and TPUs multiply\n"
          " bf16 natively and need no such copy)")


if __name__ == "__main__":
    main()
