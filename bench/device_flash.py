"""GPU check of the flash kernels (run by bench/device.sh; needs a GPU, refuses otherwise in one line).

At SD3-medium width (24 heads x 64), 1024 px (4096 image + 333 text tokens, a reference of the same size),
bf16: the kernels against xla for error (bf16 against an fp32 xla reference) and time, forward and a training
step (grads of q, k, v, the reference K/V and lambda); then the 28-step CustomShift sampler on xla vs flash, and
both against the PyTorch reference (diffusers' SD3 with our processors) in diffusers' scheduler loop.
Prints ratios and MFU (attention FLOPs over --peak-tflops).
"""
from __future__ import annotations

import argparse
import sys
import time

HEADS, HEAD_DIM, N_IMG, N_TXT = 24, 64, 4096, 333


def timed(jax, fn, *args, reps: int = 10) -> float:
    """Median seconds of `fn(*args)` after one compile-and-run call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_rows(jax, jnp, np, peak: float):
    from customshift_jax.customshift.cads import cads_attention, shift_logit
    from customshift_jax.numerics import relative_error

    nq = nr = N_IMG + N_TXT
    rng = np.random.default_rng(0)
    arrays32 = [jnp.asarray(rng.standard_normal((1, n, HEADS, HEAD_DIM)), jnp.float32) for n in (nq, nq, nq, nr, nr)]
    lam = shift_logit(jnp.linspace(-0.5, 0.5, HEADS), 1.0)
    bf16 = [x.astype(jnp.bfloat16) for x in arrays32]
    flops_fwd = 4 * HEADS * HEAD_DIM * (nq * nq + N_IMG * nr)  # two matmuls over base and reference keys
    paths = {"xla two_pass": ("xla", "two_pass"), "xla single": ("xla", "single"),
             "flash two_pass": ("flash", "two_pass"), "flash fused": ("flash", "single")}

    def fwd(backend, form):
        return jax.jit(lambda *a: cads_attention(*a, N_IMG, form=form, backend=backend))

    def step(backend, form):
        loss = lambda *a: jnp.sum(cads_attention(*a, N_IMG, form=form, backend=backend).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))

    want_out = fwd("xla", "two_pass")(*arrays32, lam)
    want_grads = step("xla", "two_pass")(*arrays32, lam)
    rows = []
    for name, (backend, form) in paths.items():
        out = fwd(backend, form)(*bf16, lam)
        grads = step(backend, form)(*bf16, lam)
        err_out = relative_error(out.astype(jnp.float32), want_out)
        err_grad = max(relative_error(g.astype(jnp.float32), w) for g, w in zip(grads, want_grads))
        t_fwd = timed(jax, fwd(backend, form), *bf16, lam)
        t_step = timed(jax, step(backend, form), *bf16, lam)
        rows.append((name, err_out, err_grad, t_fwd, t_step, flops_fwd / t_fwd / peak, 3.5 * flops_fwd / t_step / peak))
    base_fwd, base_step = rows[0][3], rows[0][4]
    print(f"attention, SD3-medium width ({HEADS} x {HEAD_DIM}), 1024 px: {nq} queries, {nr} reference keys, bf16, "
          f"batch 1; error against fp32 xla two_pass")
    print("| path | rel err out | rel err grads | fwd ms | step ms | fwd x xla | step x xla | fwd MFU | step MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, e_o, e_g, t_f, t_s, mfu_f, mfu_s in rows:
        print(f"| {name} | {e_o:.1e} | {e_g:.1e} | {t_f * 1e3:.2f} | {t_s * 1e3:.2f} | {base_fwd / t_f:.2f} | "
              f"{base_step / t_s:.2f} | {mfu_f:.1%} | {mfu_s:.1%} |")


def sampler_rows(jax, jnp, np, layers: int, steps: int):
    from customshift_jax import MMDiTConfig, get_preset, init_mmdit
    from customshift_jax.customshift.branches import init_lora, prefill
    from customshift_jax.customshift.sampling import make_customshift_sampler
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.sampling import Conditioning, make_schedule

    config = MMDiTConfig.from_diffusers_config({**get_preset("sd3-medium").to_diffusers_config(), "num_layers": layers})
    lora = LoRAConfig(rank=16, alpha=16.0)
    params = jax.jit(lambda k: init_mmdit(config, k))(jax.random.key(0))
    cgb = init_lora(config, lora, jax.random.key(2), branch="cgb")
    rng = np.random.default_rng(0)
    j, p = config.joint_attention_dim, config.pooled_projection_dim
    cond = Conditioning(*(rng.standard_normal(s).astype(np.float32) for s in
                          [(1, N_TXT, j), (1, p), (1, N_TXT, j), (1, p)]))
    ref = (rng.standard_normal((1, 16, 128, 128)).astype(np.float32),
           rng.standard_normal((1, N_TXT, j)).astype(np.float32), rng.standard_normal((1, p)).astype(np.float32))
    latents = rng.standard_normal((1, 16, 128, 128)).astype(np.float32)
    schedule = make_schedule({"shift": 3.0}, steps)
    times = {}
    for backend, form in (("xla", "two_pass"), ("flash", "single")):
        cache = prefill(config, params, *ref, lora_config=lora, dtype=jnp.bfloat16, backend=backend)
        sampler = make_customshift_sampler(config, lora, RunOptions(dtype=jnp.bfloat16, backend=backend), form=form)
        times[f"{backend} {form}"] = timed(jax, lambda s, kv: s({"base": params, "cgb": cgb}, latents, cond, schedule,
                                                             extra={"ref_kv": kv, "gamma": 1.0}, guidance_scale=7.0),
                                           sampler, cache.kv, reps=2)
    base = times["xla two_pass"]
    print(f"\nCustomShift sampler, sd3-medium, {layers} layers, 1024 px, {steps} steps, CFG 7 batched, bf16")
    for name, t in times.items():
        print(f"{name:16s} {t:8.2f} s   x xla {base / t:.2f}")


def torch_reference_rows(jax, jnp, np, layers: int, steps: int, guidance: float = 7.0, *, preset: str = "sd3-medium",
                         latent: int = 128, text_len: int = N_TXT, device: str = "cuda", backends=("xla", "flash"),
                         dtype: str = "bfloat16"):
    """The 28-step CustomShift sample, ours (jit, xla and flash) against the PyTorch reference (diffusers' SD3 with
    our reference processors, customshift_jax.reference) in diffusers' FlowMatchEulerDiscreteScheduler loop, as
    StableDiffusion3Pipeline runs it: the same weights, LoRAs, beta, inputs; bf16 on both sides, one GPU.
    (`preset`, `latent`, `device`: a tiny CPU smoke run of this same code.)"""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from customshift_jax import MMDiTConfig, get_preset
    from customshift_jax.crosscheck.customshift import random_lora
    from customshift_jax.crosscheck.mmdit import random_diffusers_transformer
    from customshift_jax.customshift.branches import prefill
    from customshift_jax.customshift.sampling import make_customshift_sampler
    from customshift_jax.models.mmdit.lora import LoRAConfig
    from customshift_jax.models.mmdit.mapping import params_from_state_dict
    from customshift_jax.models.mmdit.options import RunOptions
    from customshift_jax.numerics import relative_error
    from customshift_jax.reference.torch_customshift import TorchCustomShift
    from customshift_jax.sampling import Conditioning, make_schedule

    config = MMDiTConfig.from_diffusers_config({**get_preset(preset).to_diffusers_config(), "num_layers": layers})
    model = random_diffusers_transformer(config, seed=0)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_state_dict(config, model.state_dict()))
    lora = LoRAConfig(rank=16, alpha=16.0)
    rng = np.random.default_rng(1)
    rab, cgb = random_lora(config, lora, "rab", rng), random_lora(config, lora, "cgb", rng)
    reference = TorchCustomShift(model, lora.rank, lora.alpha, lora.targets)
    reference.load_lora_from_jax(rab, cgb)
    tdtype, jdtype = getattr(torch, dtype), jnp.dtype(dtype)
    reference.to(device, tdtype)
    j, p = config.joint_attention_dim, config.pooled_projection_dim
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    c = config.in_channels
    ref, subject, subject_pooled = f(1, c, latent, latent), f(1, text_len, j), f(1, p)
    x, prompt, pooled = f(1, c, latent, latent), f(1, text_len, j), f(1, p)
    negative, negative_pooled = f(1, text_len, j), f(1, p)
    cuda = lambda a: torch.from_numpy(a).to(device, tdtype)  # noqa: E731

    def run_torch():
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            cache = reference.prefill(cuda(ref), cuda(subject), cuda(subject_pooled))
            latents = cuda(x)
            ehs, pool = torch.cat([cuda(negative), cuda(prompt)]), torch.cat([cuda(negative_pooled), cuda(pooled)])
            for t in scheduler.timesteps:
                v = reference.forward(torch.cat([latents, latents]), t.expand(2).to(device), ehs, pool, cache=cache)
                v_uncond, v_text = v.chunk(2)
                latents = scheduler.step(v_uncond + guidance * (v_text - v_uncond), t, latents).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        return latents.float().cpu().numpy()

    theirs = run_torch()  # warm-up (cuDNN / cuBLAS choices)
    t0 = time.perf_counter()
    theirs = run_torch()
    t_torch = time.perf_counter() - t0
    cond = Conditioning(prompt, pooled, negative, negative_pooled)
    schedule = make_schedule({"shift": 3.0}, steps)
    print(f"\nCustomShift {steps}-step sample vs the PyTorch reference in diffusers' scheduler loop, {preset}, "
          f"{layers} layers, latents {latent}x{latent}, CFG {guidance:g}, {dtype}")
    print(f"{'path':16s} {'seconds':>8s} {'torch / ours':>12s} {'rel err vs torch':>16s}")
    print(f"{'torch reference':16s} {t_torch:8.2f}")
    for backend, form in [(b, "two_pass" if b == "xla" else "single") for b in backends]:
        kv = prefill(config, params, ref, subject, subject_pooled, lora_config=lora, dtype=jdtype, backend=backend,
                     rab_lora=rab).kv
        sampler = make_customshift_sampler(config, lora,
                                           RunOptions(dtype=jdtype, backend=backend), form=form)
        run = lambda: sampler({"base": params, "cgb": cgb}, x, cond, schedule, guidance_scale=guidance,  # noqa: E731
                              extra={"ref_kv": kv, "gamma": 1.0})
        ours = np.asarray(jax.block_until_ready(run()), np.float32)
        t = timed(jax, run, reps=2)
        print(f"{backend + ' ' + form:16s} {t:8.2f} {t_torch / t:12.2f} {relative_error(ours, theirs):16.1e}")
    reference.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--skip-sampler", action="store_true")
    ap.add_argument("--skip-torch", action="store_true", help="skip the sample against the PyTorch reference")
    ap.add_argument("--torch-layers", type=int, default=8,
                    help="layers of the model compared with the PyTorch reference (its eager loop is the slow part)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    if jax.default_backend() not in ("gpu", "cuda"):
        sys.exit(f"error: bench/device_flash.py needs a GPU; jax sees {jax.default_backend()!r} "
                 f"({jax.devices()[0].device_kind}). Run it on a GPU machine (pip install 'jax[cuda12]').")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    attention_rows(jax, jnp, np, args.peak_tflops * 1e12)
    if not args.skip_sampler:
        sampler_rows(jax, jnp, np, args.layers, args.steps)
    if not args.skip_torch:
        torch_reference_rows(jax, jnp, np, args.torch_layers, args.steps)


if __name__ == "__main__":
    main()
