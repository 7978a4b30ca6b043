"""Per-chip HBM from the TPU compiler (libtpu, on this CPU host: no TPU needed) for the attention backends.

At 1024 px: 4096 image + 333 text tokens (77 CLIP + 256 T5) reading a 1024 px reference of 4096 image + 333
subject-name tokens; SD3-medium width (24 heads x 64); batch 2 on one chip; bf16. Two workloads, forward
("fwd") and forward + backward ("fwd+bwd"):
  op:  the CustomShift attention of one layer (`cads_attention`); backward: grads of q, k, v, the reference
       K/V and lambda.
  cgb: the CustomShift CGB forward of a 2-layer model of SD3-medium width (layer 1 is SD3's context_pre_only
       last block), reading the reference K/V cache; backward: grads of the CGB LoRA (rank 16) and beta.
Backends: xla (dense logits), blocked (256 queries at a time), flash (Pallas through Mosaic); form two_pass
(two attentions merged by their LSEs) or single (one softmax over [base; reference]; on flash the fused
kernel). Columns: the compiler's `memory_analysis()` per chip (arguments, outputs, temporaries, their total)
in GiB and the compile seconds. Needs libtpu (`pip install "jax[tpu]"`).

    python bench/flash_tpu.py --topology v5p:2x2x1 [--workloads op cgb]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a compile-only client; other processes may hold libtpu

HEADS, HEAD_DIM, N_IMG, N_TXT, N_SUBJECT, BATCH, LORA_RANK = 24, 64, 4096, 333, 333, 2, 16
GIB = 2 ** 30
ROWS = (("xla", "two_pass"), ("xla", "single"), ("blocked", "two_pass"), ("flash", "two_pass"), ("flash", "single"))


def _mesh(jax, np, topology: str):
    import importlib.util

    from jax.experimental import topologies
    if importlib.util.find_spec("libtpu") is None:
        sys.exit("libtpu is not installed, so there is no TPU compiler here; install it with "
                 "pip install 'jax[tpu]' (the jax version this project pins).")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 - an unknown or too small topology name: one line
        sys.exit(f"cannot make TPU topology {topology!r} ({str(e).splitlines()[0]}); name one of at least a "
                 f"host, e.g. v5p:2x2x1, v5e:2x2, v6e:2x2 or v4:2x2x1.")
    return jax.sharding.Mesh(np.array(devices[:1]), ("data",)), devices[0].device_kind


def _compile(jax, mesh, fn, args):
    """(memory_analysis, seconds) of `fn` compiled for the mesh's chip."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis(), time.perf_counter() - t0


def _abstract(jax, mesh, tree):
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)


def op_cases(jax, jnp, mesh):
    """(backend, form, pass, fn, args) of one layer's CustomShift attention."""
    from customshift_jax.customshift.cads import cads_attention

    nq = N_IMG + N_TXT
    x = jax.ShapeDtypeStruct((BATCH, nq, HEADS, HEAD_DIM), jnp.bfloat16)
    ref = jax.ShapeDtypeStruct((1, N_IMG + N_SUBJECT, HEADS, HEAD_DIM), jnp.bfloat16)
    args = _abstract(jax, mesh, (x, x, x, ref, ref, jax.ShapeDtypeStruct((HEADS,), jnp.float32)))
    for backend, form in ROWS:
        def fwd(q, k, v, kr, vr, lam, backend=backend, form=form):
            return cads_attention(q, k, v, kr, vr, lam, N_IMG, form=form, backend=backend)

        def loss(*a, fwd=fwd):
            return jnp.sum(fwd(*a).astype(jnp.float32) ** 2)

        yield backend, form, "fwd", fwd, args
        yield backend, form, "fwd+bwd", jax.grad(loss, argnums=tuple(range(6))), args


def cgb_cases(jax, jnp, mesh):
    """(backend, form, pass, fn, args) of the CGB forward of a 2-layer SD3-medium-width model."""
    from customshift_jax.customshift.branches import lora_shapes, make_customshift_forward, make_prefill
    from customshift_jax.models.mmdit.api import param_shapes
    from customshift_jax.models.mmdit.config import get_preset
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.models.mmdit.options import RunOptions

    config = dataclasses.replace(get_preset("sd3-medium"), num_layers=2)
    lora = LoRAConfig(rank=LORA_RANK, alpha=float(LORA_RANK))
    f32, bf16 = jnp.float32, jnp.bfloat16
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, bf16), param_shapes(config))
    side = 1024 // 8
    sds = jax.ShapeDtypeStruct
    inputs = (sds((BATCH, 16, side, side), f32), sds((BATCH,), f32), sds((BATCH, N_TXT, config.joint_attention_dim), f32),
              sds((BATCH, config.pooled_projection_dim), f32), sds((config.num_layers,), bool))
    ref = (sds((1, 16, side, side), f32), sds((1, N_SUBJECT, config.joint_attention_dim), f32),
           sds((1, config.pooled_projection_dim), f32))
    kv = jax.eval_shape(make_prefill(config, lora, RunOptions(dtype=bf16)), params, lora_shapes(config, lora, "rab"),
                        *ref)
    cgb = lora_shapes(config, lora, "cgb")
    args = _abstract(jax, mesh, (params, cgb, *inputs, kv, sds((BATCH,), f32)))
    for backend, form in ROWS:
        forward = make_customshift_forward(config, lora, RunOptions(dtype=bf16, backend=backend), form=form)

        def loss(p, lora_params, *rest, forward=forward):
            return jnp.mean(forward(p, lora_params, *rest).astype(jnp.float32) ** 2)

        yield backend, form, "fwd", forward, args
        yield backend, form, "fwd+bwd", jax.grad(loss, argnums=1), args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p:2x2x1", help="a TPU topology name (one chip of it is compiled for)")
    ap.add_argument("--workloads", nargs="+", default=["op", "cgb"], choices=["op", "cgb"])
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh, kind = _mesh(jax, np, args.topology)
    print(f"{args.topology} ({kind}), one chip; batch {BATCH}, bf16, {HEADS} heads x {HEAD_DIM}; queries "
          f"{N_IMG}+{N_TXT}, reference {N_IMG}+{N_SUBJECT}; GiB per chip from memory_analysis()")
    print("| workload | backend | form | pass | arguments | outputs | temporaries | total | compile s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    cases = {"op": op_cases, "cgb": cgb_cases}
    for workload in args.workloads:
        for backend, form, phase, fn, fn_args in cases[workload](jax, jnp, mesh):
            try:
                m, seconds = _compile(jax, mesh, fn, fn_args)
            except Exception as e:  # noqa: BLE001 - a row that does not compile says why, the table goes on
                message = str(e).splitlines()[0]
                short = re.search(r"required for HLO temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)",
                                  message)
                why = f"does not fit: temporaries {short[1]} > HBM {short[2]}" if short else message[:100]
                print(f"| {workload} | {backend} | {form} | {phase} | {why} | | | | |", flush=True)
                continue
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            print(f"| {workload} | {backend} | {form} | {phase} | {m.argument_size_in_bytes / GIB:.2f} | "
                  f"{m.output_size_in_bytes / GIB:.2f} | {m.temp_size_in_bytes / GIB:.2f} | {total / GIB:.2f} | "
                  f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
