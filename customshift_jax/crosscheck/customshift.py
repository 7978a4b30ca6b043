"""Run our CustomShift branches and the PyTorch reference (reference/torch_customshift.py) on the same weights,
LoRAs, beta and inputs, and measure how far apart they are: `customshift crosscheck --customshift`.

Rows (DESIGN section 7 bounds): the RAB prefill's K and V per layer and the CGB forward ("cads" at each gamma,
"concat", "joint"), optionally per block, 1e-5; an N-step guided sample against the reference inside diffusers'
`FlowMatchEulerDiscreteScheduler` loop, 1e-4; optionally the gradients of a rectified-flow loss w.r.t. both
LoRAs and beta, 1e-4 per leaf (as tests/customshift/test_customshift_torch.py). Imports torch and diffusers lazily.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from customshift_jax.crosscheck.mmdit import (
    FORWARD_TOLERANCE,
    Row,
    capture_block_outputs,
    compare,
    flatten_block_outputs,
)
from customshift_jax.customshift.branches import lora_model, make_customshift_forward, make_prefill
from customshift_jax.customshift.sampling import make_customshift_sampler
from customshift_jax.io.lora_files import (
    BETA_NAME,
    RAB_PREFIX,
    LoRAFiles,
    expected_lora_shapes,
    fit_lora,
    to_state_dict,
)
from customshift_jax.models.mmdit.api import Params, skip_mask
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import LoRAConfig
from customshift_jax.models.mmdit.mapping import params_from_state_dict
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.sampling import Conditioning, make_schedule
from customshift_jax.tree_paths import key_names

SAMPLE_TOLERANCE = 1e-4  # a full sampling loop (DESIGN section 7)
GRAD_TOLERANCE = 1e-4  # one gradient leaf, as tests/customshift/test_customshift_torch.py holds it
REF_SIZE = 8  # reference latent height and width: R = 16 tokens at patch 2
SUBJECT_LEN, PROMPT_LEN = 3, 5  # subject-name and prompt token counts
SCHEDULER_SHIFT = 3.0  # SD3's timestep shift, on both sides of the sampling row
LORA_STD, BETA_STD = 0.05, 0.5  # random LoRA factors (A and B) and beta: every path live


# ---- LoRAs and inputs ----

def random_lora(config: MMDiTConfig, lora_config: LoRAConfig, branch: str, rng: np.random.Generator) -> Params:
    """One branch's LoRA tree with every leaf random (B too: a zero B would hide a bug), numpy float32."""
    def leaf(path, spec):
        std = BETA_STD if key_names(path)[-1] == "beta" else LORA_STD
        return rng.normal(0.0, std, spec.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, expected_lora_shapes(config, lora_config, branch))


@dataclasses.dataclass
class CustomShiftInputs:
    """One set of inputs for every row, numpy float32 in diffusers' layout; one reference for the whole batch."""

    ref: np.ndarray  # (1, C, REF_SIZE, REF_SIZE) reference latents
    subject: np.ndarray  # (1, S, J) subject-name embeddings
    subject_pooled: np.ndarray  # (1, P)
    x: np.ndarray  # (B, C, H, W) noisy latents of the forward rows (and x_T of the sample)
    t: np.ndarray  # (B,) timesteps on the 0-1000 scale
    prompt: np.ndarray  # (B, M, J)
    pooled: np.ndarray  # (B, P)
    negative: np.ndarray  # (B, M, J) negative prompt, for CFG in the sample
    negative_pooled: np.ndarray  # (B, P)
    x0: np.ndarray  # (B, C, H, W) clean latents of the gradient loss
    noise: np.ndarray  # (B, C, H, W) its noise
    sigma: np.ndarray  # (B,) its flow times in (0, 1)

    @classmethod
    def random(cls, config: MMDiTConfig, *, batch: int, height: int, width: int,
               seed: int = 0) -> "CustomShiftInputs":
        rng = np.random.default_rng(seed)
        f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        c, j, p = config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
        return cls(ref=f(1, c, REF_SIZE, REF_SIZE), subject=f(1, SUBJECT_LEN, j), subject_pooled=f(1, p),
                   x=f(batch, c, height, width), t=np.sort(rng.uniform(1.0, 999.0, batch)).astype(np.float32),
                   prompt=f(batch, PROMPT_LEN, j), pooled=f(batch, p), negative=f(batch, PROMPT_LEN, j),
                   negative_pooled=f(batch, p), x0=f(batch, c, height, width), noise=f(batch, c, height, width),
                   sigma=np.sort(rng.uniform(0.05, 0.95, batch)).astype(np.float32))

    def flow_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rectified flow (DESIGN section 4): x_t = (1 - s) x0 + s eps (B, C, H, W), timestep 1000 s (B,),
        target eps - x0 (B, C, H, W)."""
        s = self.sigma[:, None, None, None]
        x_t = ((1 - s) * self.x0 + s * self.noise).astype(np.float32)
        return x_t, (1000.0 * self.sigma).astype(np.float32), (self.noise - self.x0).astype(np.float32)


# ---- one model's case: both sides built on the same numbers ----

@dataclasses.dataclass
class CustomShiftCase:
    """One model: its JAX params and the PyTorch reference, both LoRAs and beta on both, the inputs."""

    name: str
    config: MMDiTConfig
    lora_config: LoRAConfig  # rank, alpha, targets of both LoRAs (the CGB's beta comes with its tree)
    params: Params
    rab: Params
    cgb: Params  # includes beta (L, H) per group
    reference: Any  # reference.torch_customshift.TorchCustomShift, hooks installed on the torch transformer
    inputs: CustomShiftInputs
    skip_layers: tuple[int, ...] = ()

    def close(self) -> None:
        """Take the reference's hooks off the torch transformer (plain diffusers again)."""
        self.reference.remove()


def build_case(name: str, config: MMDiTConfig, torch_model, *, params: Params | None = None,
               lora_files: LoRAFiles | None = None, rank: int = 4,
               alpha: float = 8.0, batch: int = 2, height: int = 8, width: int = 12, seed: int = 0,
               skip_layers: Sequence[int] = ()) -> CustomShiftCase:
    """Map `torch_model` (unless `params` given), draw both LoRAs and beta (or take `lora_files`, from
    `read_lora_files`), and put the same ones on the PyTorch reference."""
    from customshift_jax.reference.torch_customshift import TorchCustomShift

    skip_mask(config, skip_layers)  # an index outside the model is an error, before anything runs
    if params is None:
        params = params_from_state_dict(config, torch_model.state_dict())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if lora_files is not None:
        try:
            lora_config, rab, cgb = fit_lora(lora_files, config)
        except ValueError as e:
            raise ValueError(f"--lora does not fit {name}: {' '.join(str(e).split())}") from None
    else:
        lora_config = LoRAConfig(rank=rank, alpha=alpha)
        rng = np.random.default_rng(seed + 1)
        rab, cgb = random_lora(config, lora_config, "rab", rng), random_lora(config, lora_config, "cgb", rng)
    reference = TorchCustomShift(torch_model, lora_config.rank, lora_config.alpha, lora_config.targets)
    try:
        reference.load_lora_from_jax(rab, cgb)
    except BaseException:
        reference.remove()
        raise
    inputs = CustomShiftInputs.random(config, batch=batch, height=height, width=width, seed=seed)
    return CustomShiftCase(name, config, lora_config, params, rab, cgb, reference, inputs, tuple(skip_layers))


# ---- jitted JAX functions, cached so that repeated checks compile once ----

@functools.lru_cache(maxsize=16)
def _jax_prefill(config: MMDiTConfig, lora_config: LoRAConfig):
    """jit of f(params, rab, ref, subject, subject_pooled) -> {group: (K, V)}."""
    return jax.jit(make_prefill(config, lora_config))


@functools.lru_cache(maxsize=16)
def _jax_forward(config: MMDiTConfig, lora_config: LoRAConfig, shift: str, per_block: bool):
    """f(params, cgb, x, t, ehs, pooled, skip, ref_kv, gamma) -> sample, or (sample, per-group blocks)."""
    if not per_block:
        return jax.jit(make_customshift_forward(config, lora_config, shift=shift))
    model = lora_model(config, lora_config, RunOptions(returns="sample_and_blocks"), shift=shift)

    def forward(params, cgb, x, t, ehs, pooled, skip, ref_kv, gamma):
        return model.apply({"params": params, "lora": cgb}, x, t, ehs, pooled, skip, ref_kv,
                           jnp.asarray(gamma, jnp.float32))

    return jax.jit(forward)


@functools.lru_cache(maxsize=16)
def _jax_sampler(config: MMDiTConfig, lora_config: LoRAConfig):
    """Our jitted CustomShift sampler (cache as an input, CFG)."""
    return make_customshift_sampler(config, lora_config)


@functools.lru_cache(maxsize=16)
def _jax_loss_grad(config: MMDiTConfig, rab_lora_config: LoRAConfig, cgb_lora_config: LoRAConfig):
    """jit(grad) of the rectified-flow loss w.r.t. (RAB LoRA, CGB LoRA with beta); the prefill runs inside."""
    prefill_fn = make_prefill(config, rab_lora_config)
    forward = make_customshift_forward(config, cgb_lora_config)

    def loss(rab, cgb, params, ref, subject, subject_pooled, x_t, t, ehs, pooled, target, skip, gamma):
        kv = prefill_fn(params, rab, ref, subject, subject_pooled)
        v = forward(params, cgb, x_t, t, ehs, pooled, skip, kv, gamma)  # (B, C, H, W)
        return jnp.mean(jnp.square(v - target))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _t(a: np.ndarray):
    """numpy -> torch, sharing memory."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _layers(config: MMDiTConfig, kv: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """{group "a:b": (K, V) (L_g, B, N, H, D)} -> per layer (K, V), each (B, N, H, D)."""
    out = []
    for start, stop in config.block_groups():
        k, v = kv[f"{start}:{stop}"]
        out.extend((np.asarray(k[j]), np.asarray(v[j])) for j in range(stop - start))
    return out


def _jax_kv(case: CustomShiftCase) -> dict:
    """Our RAB prefill of the case's reference: {group: (K, V)}, each (L_g, 1, R+S, H, D)."""
    i = case.inputs
    return _jax_prefill(case.config, case.lora_config)(case.params, case.rab, i.ref, i.subject, i.subject_pooled)


def _torch_kv(case: CustomShiftCase):
    """The reference's RAB prefill: per layer (K, V), each (1, R+S, H, D) torch."""
    i = case.inputs
    return case.reference.prefill(_t(i.ref), _t(i.subject), _t(i.subject_pooled))


# ---- the rows ----

def check_prefill(case: CustomShiftCase) -> list[Row]:
    """Per layer, the RAB's K and V of [r; s] after qk-norm, (1, R+S, H, D) each."""
    import torch

    ours = _layers(case.config, _jax_kv(case))
    with torch.no_grad():
        theirs = _torch_kv(case)
    if len(theirs) != len(ours):
        raise RuntimeError(f"the PyTorch reference recorded {len(theirs)} layers, JAX {len(ours)}.")
    rows = []
    for layer, ((jk, jv), (tk, tv)) in enumerate(zip(ours, theirs)):
        rows.append(compare(case.name, f"prefill K layer {layer}", jk, tk.numpy(), FORWARD_TOLERANCE))
        rows.append(compare(case.name, f"prefill V layer {layer}", jv, tv.numpy(), FORWARD_TOLERANCE))
    return rows


def _shift_label(shift: str, gamma: float) -> str:
    """The row name of one CGB forward: gamma only where it acts ("cads")."""
    return f"CGB forward {shift}" + (f" gamma={gamma:g}" if shift == "cads" else "")


def check_forward(case: CustomShiftCase, shift: str, gamma: float = 1.0, per_block: bool = False) -> list[Row]:
    """The CGB forward reading the cache (each side its own prefill), (B, C, H, W); with `per_block` also the
    image and text streams after every executed block."""
    import torch

    i = case.inputs
    fn = _jax_forward(case.config, case.lora_config, shift, per_block)
    out = fn(case.params, case.cgb, i.x, i.t, i.prompt, i.pooled, skip_mask(case.config, case.skip_layers),
             _jax_kv(case), gamma)
    ours, jax_blocks = (out[0], flatten_block_outputs(out[1])) if per_block else (out, [])
    with torch.no_grad():
        cache = _torch_kv(case)  # outside the capture: the prefill runs the same blocks
        with capture_block_outputs(case.reference.transformer, enabled=per_block) as torch_blocks:
            theirs = case.reference.forward(_t(i.x), _t(i.t), _t(i.prompt), _t(i.pooled), cache, gamma=gamma,
                                            shift=shift, skip_layers=case.skip_layers)
    label = _shift_label(shift, gamma)
    rows = [compare(case.name, label, np.asarray(ours), theirs.numpy(), FORWARD_TOLERANCE)]
    return rows + _block_rows(case, label, jax_blocks, torch_blocks)


def _block_rows(case: CustomShiftCase, label: str, jax_blocks, torch_blocks) -> list[Row]:
    """Image (B, N, D) and text (B, M, D) streams after every executed block; torch records only those, and no
    text stream after the last block (context_pre_only)."""
    executed = [b for b in range(case.config.num_layers) if b not in case.skip_layers]
    rows = []
    for b, (tx, tc) in zip(executed, torch_blocks):
        jx, jc = jax_blocks[b]
        rows.append(compare(case.name, f"{label} block {b} image", jx, tx, FORWARD_TOLERANCE))
        if tc is not None:
            rows.append(compare(case.name, f"{label} block {b} text", jc, tc, FORWARD_TOLERANCE))
    return rows


def check_sample(case: CustomShiftCase, steps: int = 4, guidance: float = 5.0, gamma: float = 1.5) -> Row:
    """An N-step CFG sample from x_T = inputs.x: our jitted sampler against the reference (prefill once, CGB per
    step) in diffusers' FlowMatchEulerDiscreteScheduler loop, as StableDiffusion3Pipeline runs it."""
    i = case.inputs
    ours = _jax_sampler(case.config, case.lora_config)(
        {"base": case.params, "cgb": case.cgb}, i.x, Conditioning(i.prompt, i.pooled, i.negative,
                                                                       i.negative_pooled),
        make_schedule({"shift": SCHEDULER_SHIFT}, steps), guidance_scale=guidance,
        extra={"ref_kv": _jax_kv(case), "gamma": gamma})
    theirs = _torch_sample(case, steps, guidance, gamma)
    return compare(case.name, f"sample {steps} steps cfg={guidance:g} gamma={gamma:g}", np.asarray(ours), theirs,
                   SAMPLE_TOLERANCE)


def _torch_sample(case: CustomShiftCase, steps: int, guidance: float, gamma: float) -> np.ndarray:
    """The reference's z_0 (B, C, H, W): CFG with [negative; prompt] stacked, one Euler step per timestep."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    i = case.inputs
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        cache = _torch_kv(case)
        latents = _t(i.x)
        ehs = torch.cat([_t(i.negative), _t(i.prompt)])  # (2B, M, J)
        pooled = torch.cat([_t(i.negative_pooled), _t(i.pooled)])  # (2B, P)
        for t in scheduler.timesteps:
            v = case.reference.forward(torch.cat([latents, latents]), t.expand(2 * latents.shape[0]), ehs, pooled,
                                       cache=cache, gamma=gamma)
            v_uncond, v_text = v.chunk(2)
            latents = scheduler.step(v_uncond + guidance * (v_text - v_uncond), t, latents).prev_sample
    return latents.numpy()


def check_grads(case: CustomShiftCase, gamma: float = 1.0) -> list[Row]:
    """d loss / d (RAB LoRA, CGB LoRA, beta) of the rectified-flow loss mean((v - (eps - x0))^2), the cache made
    inside the loss: jax.grad against torch autograd; one row per branch and layer, its worst leaf named."""
    grads_jax = _jax_grads(case, gamma)
    grads_torch = _torch_grads(case, gamma)
    if set(grads_jax) != set(grads_torch):
        raise RuntimeError(f"gradient keys differ: {sorted(set(grads_jax) ^ set(grads_torch))[:5]}")
    worst: dict[tuple[str, int], Row] = {}
    for key in grads_jax:
        (label, layer), leaf = _grad_group(key)
        quantity = f"grad {label} layer {layer}" + ("" if label == "beta" else f": {leaf}")
        row = compare(case.name, quantity, grads_jax[key], grads_torch[key], GRAD_TOLERANCE)
        held = worst.get((label, layer))
        if held is None or _badness(row) > _badness(held):
            worst[label, layer] = row
    order = {"RAB LoRA": 0, "CGB LoRA": 1, "beta": 2}
    return [worst[k] for k in sorted(worst, key=lambda k: (order[k[0]], k[1]))]


def _badness(row: Row) -> float:
    """The row's relative error, a NaN counting as the worst."""
    return row.rel if np.isfinite(row.rel) else np.inf


def _grad_group(key: str) -> tuple[tuple[str, int], str]:
    """State-dict key -> ((branch label, layer), leaf within the layer, e.g. "attn.to_q.lora_B")."""
    label = "RAB LoRA" if key.startswith(RAB_PREFIX) else "beta" if key.endswith(BETA_NAME) else "CGB LoRA"
    parts = key.removeprefix(RAB_PREFIX).split(".")  # transformer_blocks, N, module..., lora_X, weight
    leaf = ".".join(parts[2:]).removesuffix(".weight")
    return (label, int(parts[1])), leaf


def _jax_grads(case: CustomShiftCase, gamma: float) -> dict[str, np.ndarray]:
    """jax.grad of the loss, in the export naming (customshift_jax.io.lora_files)."""
    i = case.inputs
    x_t, t, target = i.flow_batch()
    grad = _jax_loss_grad(case.config, case.lora_config, case.lora_config)
    g_rab, g_cgb = grad(case.rab, case.cgb, case.params, i.ref, i.subject, i.subject_pooled, x_t, t, i.prompt,
                        i.pooled, target, skip_mask(case.config, case.skip_layers), jnp.float32(gamma))
    return {k: np.asarray(v) for k, v in to_state_dict(jax.device_get(g_rab), jax.device_get(g_cgb)).items()}


def _torch_grads(case: CustomShiftCase, gamma: float) -> dict[str, np.ndarray]:
    """torch autograd of the same loss on the reference, in the export naming; grads cleared after."""
    import torch

    i = case.inputs
    x_t, t, target = i.flow_batch()
    ref = case.reference
    ref.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            v = ref.forward(_t(x_t), _t(t), _t(i.prompt), _t(i.pooled), _torch_kv(case), gamma=gamma,
                            skip_layers=case.skip_layers)
            torch.mean(torch.square(v - _t(target))).backward()
        return {k: g.numpy() for k, g in ref.lora_grad_state_dict().items()}
    finally:
        ref.zero_grad(set_to_none=True)


def crosscheck_customshift(case: CustomShiftCase, *, gammas: Sequence[float] = (0.5, 1.0, 2.0), steps: int = 4,
                           guidance: float = 5.0, sample_gamma: float = 1.5, grads: bool = False,
                           per_block: bool = False) -> list[Row]:
    """Every row of one model: prefill per layer, CGB forward per shift / gamma, the sample, (gradients)."""
    with jax.default_matmul_precision("highest"):
        rows = check_prefill(case)
        for gamma in gammas:
            rows += check_forward(case, "cads", gamma, per_block)
        rows += check_forward(case, "concat", 1.0, per_block)
        rows += check_forward(case, "joint", 1.0, per_block)
        rows.append(check_sample(case, steps, guidance, sample_gamma))
        if grads:
            rows += check_grads(case)
    return rows


__all__ = ["CustomShiftCase", "CustomShiftInputs", "build_case", "check_forward", "check_grads", "check_prefill",
           "check_sample", "crosscheck_customshift", "random_lora",
           "GRAD_TOLERANCE", "SAMPLE_TOLERANCE"]
