"""Attention kernels for CustomShift: error against `xla`, and the compiler's memory of one layer's attention.

1. Error (CPU, Pallas interpret mode, fp32): the flash kernel and the fused shifted kernel against the xla
   backend, forward (out, LSE) and gradients, on a small shape with ragged lengths.
2. Memory: one SD3.5-large layer's CustomShift attention (38 heads x 64, image queries + 333 text tokens
   reading a reference of the same size) at 512 and 1024 px, forward and forward+backward (grads of q, k, v,
   the reference K/V and lambda), batch 1. From the compiler (`memory_analysis()` of the CPU compile:
   arguments + outputs + temporaries) for xla, blocked and the kernel's interpret mode (its grid loop over
   the same HBM arrays: a stand-in, not the GPU / TPU compile), and analytic HBM bytes of the kernel (inputs,
   their (B, H, N, D) padded copies, out, LSE, row bias; backward adds dO, delta and the gradients).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HEADS, HEAD_DIM, TEXT_TOKENS = 38, 64, 333  # SD3.5-large; 77 CLIP + 256 T5 tokens
GB = 1e9


def _image_tokens(px: int) -> int:
    return (px // 8 // 2) ** 2  # VAE /8, patch 2


def error_rows(jax, jnp, np):
    """(name, quantity, rel err) of each kernel against xla, interpret mode, fp32."""
    from customshift_jax.customshift.cads import cads_attention, shift_logit, single_form_bias
    from customshift_jax.kernels import shifted_flash_attention
    from customshift_jax.models.mmdit.attention import attention
    from customshift_jax.numerics import relative_error

    b, n_img, n_txt, r, h, d = 2, 100, 29, 117, 4, 64  # ragged against every block size
    nq = n_img + n_txt
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, nq, h, d)), jnp.float32) for _ in range(3))
    k_ref, v_ref = (jnp.asarray(rng.standard_normal((b, r, h, d)), jnp.float32) for _ in range(2))
    lam = shift_logit(jnp.linspace(-0.5, 0.5, h), jnp.asarray([0.5, 2.0]))

    def xla_single(q, k, v, k_ref, v_ref, lam):
        bias = single_form_bias(lam, n_img, nq, nq, r)
        return attention(q, jnp.concatenate([k, k_ref], 1), jnp.concatenate([v, v_ref], 1), bias=bias,
                         return_lse=True)

    cases = {
        "flash (joint)": (lambda b_: lambda q, k, v: attention(q, k, v, backend=b_, return_lse=True), (q, k, v)),
        "flash shifted (single, fused)": (
            lambda b_: (lambda *a: shifted_flash_attention(*a, n_img)) if b_ == "flash" else xla_single,
            (q, k, v, k_ref, v_ref, lam)),
        "flash two-pass (LSE merge)": (
            lambda b_: lambda *a: cads_attention(*a, n_img, form="two_pass", backend=b_), (q, k, v, k_ref, v_ref, lam)),
    }
    def outputs_and_grads(fn, args):
        def loss(*a):
            out = fn(*a)
            return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree_util.tree_leaves(out)), out
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)

    rows = []
    for name, (make, args) in cases.items():
        (g_got, o_got), (g_want, o_want) = outputs_and_grads(make("flash"), args), outputs_and_grads(make("xla"), args)
        o_got, o_want = jax.tree_util.tree_leaves(o_got), jax.tree_util.tree_leaves(o_want)
        rows.append((name, "out", relative_error(o_got[0], o_want[0])))
        if len(o_got) > 1:
            rows.append((name, "lse", relative_error(o_got[1], o_want[1])))
        labels = ["dq", "dk", "dv", "dk_ref", "dv_ref", "dlambda"]
        rows.append((name, "grads (max)", max(relative_error(a, w) for a, w in zip(g_got, g_want))))
        rows += [(name, labels[i], relative_error(a, w)) for i, (a, w) in enumerate(zip(g_got, g_want)) if i >= 3]
    return rows


def compiled_bytes(jax, fn, args) -> float:
    """Arguments + outputs + temporaries - aliased, from the CPU compile of `fn` (nothing runs)."""
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def kernel_bytes(nq: int, nk: int, nr: int, itemsize: int, backward: bool, block: int = 128) -> float:
    """Analytic HBM bytes of the fused shifted kernel (batch 1): the (N, H, D) tensors it keeps, the padded
    (B, H, N, D) copies the wrapper makes, and the (H, Nq) float32 rows; no (Nq, Nk) tile outlives a block."""
    pad = lambda n: -(-n // block) * block
    tok = HEADS * HEAD_DIM * itemsize
    inputs = (nq + 2 * nk + 2 * nr) * tok
    padded = (pad(nq) + 2 * pad(nk) + 2 * pad(nr)) * tok
    rows = 2 * HEADS * pad(nq) * 4  # lse, row bias
    out = (pad(nq) + nq) * tok  # kernel layout + model layout
    if not backward:
        return inputs + padded + rows + out
    grads = 2 * ((pad(nq) + 2 * pad(nk) + 2 * pad(nr)) * tok)  # kernel-layout grads and their model-layout copies
    return inputs + padded + rows + out + 2 * pad(nq) * tok + HEADS * pad(nq) * 4 + grads  # + dO (2 layouts), delta


def memory_rows(jax, jnp, dtype):
    from customshift_jax.customshift.cads import cads_attention

    rows = []
    for px in (512, 1024):
        n_img = _image_tokens(px)
        nq = nr = n_img + TEXT_TOKENS
        shape = lambda n: jax.ShapeDtypeStruct((1, n, HEADS, HEAD_DIM), dtype)
        args = (shape(nq), shape(nq), shape(nq), shape(nr), shape(nr), jax.ShapeDtypeStruct((HEADS,), jnp.float32))
        for backend, form in (("xla", "two_pass"), ("xla", "single"), ("blocked", "two_pass"),
                              ("blocked", "single"), ("flash", "single")):
            def fwd(*a, backend=backend, form=form, n_img=n_img):
                return cads_attention(*a, n_img, form=form, backend=backend)

            def step(*a, fwd=fwd):
                return jax.grad(lambda *x: jnp.sum(fwd(*x).astype(jnp.float32) ** 2), argnums=tuple(range(6)))(*a)

            name, source = f"{backend} {form}", "compiler"
            if backend == "flash":
                name, source = "flash fused (kernel)", "compiler, CPU interpret mode"
            rows.append((px, nq, name, source, compiled_bytes(jax, fwd, args), compiled_bytes(jax, step, args)))
        itemsize = jnp.dtype(dtype).itemsize
        rows.append((px, nq, "flash fused (kernel)", "analytic", kernel_bytes(nq, nq, nr, itemsize, False),
                     kernel_bytes(nq, nq, nr, itemsize, True)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="memory table dtype")
    ap.add_argument("--skip-error", action="store_true", help="only the memory table")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    if not args.skip_error:
        print("error against xla (CPU, Pallas interpret mode, fp32; B 2, 100 image + 29 text queries, 117 "
              "reference keys, 4 heads x 64)")
        print(f"| {'kernel':30s} | {'quantity':11s} | rel err |")
        print(f"| {'-' * 30} | {'-' * 11} | ------- |")
        for name, what, err in error_rows(jax, jnp, np):
            print(f"| {name:30s} | {what:11s} | {err:.1e} |")
        print()
    print(f"peak memory of one SD3.5-large layer's CustomShift attention ({HEADS} heads x {HEAD_DIM}, {args.dtype}, "
          f"batch 1, reference = image + {TEXT_TOKENS} subject tokens), GB")
    print("| px | queries = reference keys | path | source | forward | forward + backward |")
    print("| --- | --- | --- | --- | --- | --- |")
    for px, n, name, source, fwd, step in memory_rows(jax, jnp, jnp.dtype(args.dtype)):
        print(f"| {px} | {n} | {name} | {source} | {fwd / GB:.2f} | {step / GB:.2f} |")


if __name__ == "__main__":
    main()
