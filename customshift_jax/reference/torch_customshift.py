"""PyTorch reference of CustomShift's two branches (DESIGN section 4) on diffusers' `SD3Transformer2DModel`.

`TorchCustomShift(transformer, lora_rank, lora_alpha, targets)` adds, without changing the transformer's
own weights or state dict:
  * two hand-written LoRA sets, "rab" (Reference-Alignment Branch) and "cgb" (Cross-Guidance Branch), as
    forward hooks on the targeted `nn.Linear`s of `transformer_blocks` (y = x W^T + b + s (x A^T) B^T,
    s = alpha / rank; A (r, in), B (out, r), PEFT's layout). Targets are matched exactly as
    `customshift_jax.models.mmdit.lora.LoRAConfig.targets_path` matches them (dotted suffixes, attn2 included);
  * `beta` (num_layers, heads), the learned CADS shift of the CGB;
  * `CustomShiftAttnProcessor` on every block's joint `attn` (a `JointAttnProcessor2_0` subclass); `attn2`
    keeps diffusers' own processor: it never reads the reference.
LoRA and processors are active only inside `prefill` / `forward` (a context variable scoped to the call):
calling `transformer(...)` directly is plain diffusers. `prefill` and `forward` are pure functions of their
inputs and the parameters. Base weights are frozen (requires_grad False); only LoRA and beta train.

LoRA file format (see `customshift_jax.io.lora_files`): `export_lora_state_dict()` returns
  `transformer_blocks.N.<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r): the CGB, PEFT's
      default adapter names (loadable onto a plain diffusers SD3 with peft, adapter "cgb");
  `transformer_blocks.N.attn.cads_beta` (H,): the CGB's beta of layer N;
  `rab.transformer_blocks.N.<module>.lora_A.weight` / `...lora_B.weight`: the RAB under the "rab." prefix.
`customshift_jax.io.lora_files.save_lora_files` writes it as diffusers-loadable safetensors files.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from customshift_jax.io import lora_files as lora_format
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.lora import DEFAULT_TARGETS, LoRAConfig
from customshift_jax.models.mmdit.mapping import to_numpy

BRANCHES = ("rab", "cgb")
SHIFTS = ("cads", "concat", "joint")  # joint: the OminiControl-style baseline, every query reads the reference
KV = tuple[torch.Tensor, torch.Tensor]  # (K, V), each (B_ref, R+S, H, D)


@dataclasses.dataclass
class _CallState:
    """What one `prefill` / `forward` call tells the hooks and processors; lives only during that call."""

    branch: str  # whose LoRA is active: "rab" or "cgb"
    capture: list[KV] | None = None  # prefill: per-layer (K, V) of [r; s] appended here
    cache: Sequence[KV] | None = None  # forward: per-layer reference (K, V)
    lam: torch.Tensor | None = None  # forward: (num_layers, H) float32 shift logits lambda
    shift: str = "cads"  # forward: "joint" puts the reference tokens in the joint sequence instead of CADS


_CALL: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("customshift_call", default=None)


@contextlib.contextmanager
def _call(state: _CallState) -> Iterator[_CallState]:
    token = _CALL.set(state)
    try:
        yield state
    finally:
        _CALL.reset(token)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v and its log-sum-exp, statistics in float32.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D). Returns out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32.
    """
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)  # (B, H, Nq, Nk)
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, Nq)
    probs = torch.exp(logits - lse[..., None]).to(v.dtype)
    return torch.matmul(probs, v).to(q.dtype), lse


def cads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
                   lam: torch.Tensor, n_img: int) -> torch.Tensor:
    """Joint attention where the first `n_img` queries also read (k_ref, v_ref) through the CADS merge.

    q: (B, H, Nq, D), image queries first; k, v: (B, H, Nk, D) base keys [x; c]; k_ref, v_ref: (B or 1, H, R, D);
    lam: (H,) float32. alpha = sigmoid(LSE_R - LSE_B + lam); image out = (1 - alpha) o_B + alpha o_R.
    """
    b = q.shape[0]
    k_ref = k_ref.expand(b, *k_ref.shape[1:]).to(k.dtype)
    v_ref = v_ref.expand(b, *v_ref.shape[1:]).to(v.dtype)
    o_base, lse_base = _attention_lse(q, k, v)  # (B, H, Nq, D), (B, H, Nq)
    o_ref, lse_ref = _attention_lse(q[:, :, :n_img], k_ref, v_ref)  # (B, H, N, D), (B, H, N)
    alpha = torch.sigmoid(lse_ref - lse_base[:, :, :n_img] + lam.float()[None, :, None])[..., None]  # (B, H, N, 1)
    img = (1 - alpha) * o_base[:, :, :n_img].float() + alpha * o_ref.float()
    return torch.cat([img.to(o_base.dtype), o_base[:, :, n_img:]], dim=2)


class CustomShiftAttnProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` of block `layer`'s joint `attn`, with the CustomShift hooks of the current call.

    Prefill: records K, V of all tokens after qk-norm, (B, N+M, H, D). Forward with a cache: image queries
    read the layer's reference K/V through CADS; text queries attend over the base tokens only (shift "joint":
    every query, text too, attends over [x; c; r; s] in one softmax). Outside a call it is diffusers' processor.
    """

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        state = _CALL.get()
        if state is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def proj(linear, x, norm=None):  # (B, N, H*D) -> (B, H, N, D), then qk-norm
            y = linear(x)
            y = y.view(b, -1, heads, y.shape[-1] // heads).transpose(1, 2)
            return norm(y) if norm is not None else y

        q = proj(attn.to_q, hidden_states, attn.norm_q)
        k = proj(attn.to_k, hidden_states, attn.norm_k)
        v = proj(attn.to_v, hidden_states)
        ck = proj(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)
        cv = proj(attn.add_v_proj, encoder_hidden_states)
        k = torch.cat([k, ck], dim=2)  # (B, H, N+M, D)
        v = torch.cat([v, cv], dim=2)
        if not attn.context_pre_only:  # the last block's text queries are never used
            cq = proj(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)
            q = torch.cat([q, cq], dim=2)  # (B, H, N+M, D)
        if state.capture is not None:
            state.capture.append((k.transpose(1, 2), v.transpose(1, 2)))  # (B, N+M, H, D) each
        if state.cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        else:
            k_ref, v_ref = (a.transpose(1, 2) for a in state.cache[self.layer])  # (B_ref, H, R+S, D)
            if state.shift == "joint":  # one softmax over [x; c; r; s] for every query
                k_ref, v_ref = (a.expand(b, -1, -1, -1).to(k.dtype) for a in (k_ref, v_ref))
                out = F.scaled_dot_product_attention(q, torch.cat([k, k_ref], dim=2), torch.cat([v, v_ref], dim=2),
                                                     dropout_p=0.0, is_causal=False)
            else:
                out = cads_attention(q, k, v, k_ref, v_ref, state.lam[self.layer], n_img)
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)  # (B, Nq, H*D)
        img = attn.to_out[1](attn.to_out[0](out[:, :n_img]))
        if attn.context_pre_only:
            return img, None  # the block discards the last layer's text stream
        return img, attn.to_add_out(out[:, n_img:])


class LoRAPair(torch.nn.Module):
    """One linear's LoRA factors in PEFT's layout: lora_A (r, in), lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        bound = in_features ** -0.5  # PEFT's kaiming-uniform(a=sqrt(5)) bound
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank))


def _safe(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold "."


class TorchCustomShift(torch.nn.Module):
    """diffusers' SD3 transformer plus the RAB and CGB LoRA sets and beta: `prefill` and `forward` of both branches.

    Installs hooks and processors on `transformer` in place (its state dict stays diffusers'); `remove()` undoes it.
    """

    def __init__(self, transformer: torch.nn.Module, lora_rank: int = 16, lora_alpha: float = 16.0,
                 targets: Sequence[str] = DEFAULT_TARGETS):
        super().__init__()
        if any(isinstance(a.processor, CustomShiftAttnProcessor) for a in self._joint_attns(transformer)):
            raise ValueError("this transformer already carries a TorchCustomShift; call remove() on that one first.")
        self.transformer = transformer
        self.config = MMDiTConfig.from_diffusers_config(dict(transformer.config))
        self.lora_config = LoRAConfig(rank=lora_rank, alpha=lora_alpha, targets=tuple(targets))
        self.scale = self.lora_config.scale
        transformer.requires_grad_(False)
        self.num_layers = len(transformer.transformer_blocks)
        self.heads = transformer.transformer_blocks[0].attn.heads
        self.targets: dict[str, torch.nn.Linear] = {
            name: mod for name, mod in transformer.named_modules()
            if isinstance(mod, torch.nn.Linear) and self._targeted(name)}
        if not self.targets:
            raise ValueError(f"no linear of transformer_blocks matches the LoRA targets {list(targets)}.")
        self.lora = torch.nn.ModuleDict({
            branch: torch.nn.ModuleDict({_safe(n): LoRAPair(m.in_features, m.out_features, lora_rank)
                                         for n, m in self.targets.items()}) for branch in BRANCHES})
        self.beta = torch.nn.Parameter(torch.zeros(self.num_layers, self.heads))  # (L, H)
        self._handles = [m.register_forward_hook(self._lora_hook(n)) for n, m in self.targets.items()]
        self._old_processors = []
        for i, block in enumerate(transformer.transformer_blocks):
            self._old_processors.append(block.attn.processor)
            block.attn.set_processor(CustomShiftAttnProcessor(i))

    @staticmethod
    def _joint_attns(transformer) -> list[Attention]:
        return [block.attn for block in transformer.transformer_blocks]

    def _targeted(self, name: str) -> bool:
        """The JAX rule on the equivalent Flax path ("transformer_blocks", "a:b", "scan", ...)."""
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "transformer_blocks":
            return False
        index = int(parts[1])
        group = next(f"{a}:{b}" for a, b in self.config.block_groups() if a <= index < b)
        return self.lora_config.targets_path(("transformer_blocks", group, "scan", *parts[2:]))

    def _lora_hook(self, name: str):
        key = _safe(name)

        def hook(module: torch.nn.Linear, args: tuple, output: torch.Tensor):
            state = _CALL.get()
            if state is None:
                return None
            pair = self.lora[state.branch][key]
            x = args[0]
            return output + self.scale * F.linear(F.linear(x, pair.lora_A.to(x.dtype)), pair.lora_B.to(x.dtype))

        return hook

    def remove(self) -> None:
        """Take the hooks and processors off the transformer (it is plain diffusers again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for block, proc in zip(self.transformer.transformer_blocks, self._old_processors):
            block.attn.set_processor(proc)

    # ---- the two branches ----

    def prefill(self, ref_latents: torch.Tensor, subject_embeds: torch.Tensor,
                subject_pooled: torch.Tensor) -> list[KV]:
        """The RAB at timestep 0: latents (B_ref, C, H, W), subject embeds (B_ref, S, J), pooled (B_ref, P)
        -> per layer (K, V) of [r; s] after qk-norm, each (B_ref, R+S, heads, head_dim)."""
        t0 = torch.zeros(ref_latents.shape[0], dtype=ref_latents.dtype, device=ref_latents.device)
        with _call(_CallState("rab", capture=[])) as state:
            self.transformer(hidden_states=ref_latents, timestep=t0, encoder_hidden_states=subject_embeds,
                             pooled_projections=subject_pooled, return_dict=False)
        if len(state.capture) != self.num_layers:
            raise RuntimeError(f"prefill recorded {len(state.capture)} layers, expected {self.num_layers}.")
        return state.capture

    def shift_logits(self, gamma: float | torch.Tensor = 1.0, shift: str = "cads") -> torch.Tensor:
        """lambda (num_layers, H) float32: beta + log(gamma) for "cads", 0 for "concat" and "joint"."""
        if shift not in SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; expected one of {SHIFTS}.")
        if shift in ("concat", "joint"):
            return torch.zeros_like(self.beta, dtype=torch.float32)
        return self.beta.float() + torch.log(torch.as_tensor(gamma, dtype=torch.float32, device=self.beta.device))

    def _check_cache(self, cache: Sequence[KV], batch: int) -> None:
        if len(cache) != self.num_layers:
            raise ValueError(f"the reference cache has {len(cache)} layers, this model {self.num_layers}.")
        head_dim = self.transformer.transformer_blocks[0].attn.inner_dim // self.heads
        for i, (k, v) in enumerate(cache):
            if (k.ndim != 4 or k.shape != v.shape or k.shape[2:] != (self.heads, head_dim)
                    or k.shape[0] not in (1, batch)):
                raise ValueError(f"reference cache layer {i}: K {tuple(k.shape)}, V {tuple(v.shape)}; expected "
                                 f"(1 or {batch}, R+S, {self.heads}, {head_dim}) each.")

    def forward(self, hidden_states: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, cache: Sequence[KV] | None = None, gamma: float = 1.0,
                shift: str = "cads", skip_layers: Sequence[int] | None = None) -> torch.Tensor:
        """The CGB: diffusers' arguments plus the reference cache (None: the base forward with the CGB LoRA).

        Returns the sample (B, C, H, W). `gamma` > 0 follows the reference more, 0 removes it (shift "cads";
        "concat" and "joint" ignore it).
        """
        b = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, dtype=hidden_states.dtype, device=hidden_states.device).reshape(-1)
        timestep = timestep.expand(b) if timestep.numel() == 1 else timestep
        lam = None
        if cache is not None:
            self._check_cache(cache, b)
            lam = self.shift_logits(gamma, shift)
        with _call(_CallState("cgb", cache=cache, lam=lam, shift=shift)):
            (sample,) = self.transformer(hidden_states=hidden_states, timestep=timestep,
                                         encoder_hidden_states=encoder_hidden_states,
                                         pooled_projections=pooled_projections, return_dict=False,
                                         skip_layers=list(skip_layers) if skip_layers else None)
        return sample

    # ---- LoRA state ----

    def named_lora_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict key, parameter) of both LoRA sets and beta (row views of `beta`), in the export naming."""
        for branch in ("cgb", "rab"):
            prefix = lora_format.RAB_PREFIX if branch == "rab" else ""
            for name in self.targets:
                pair = self.lora[branch][_safe(name)]
                yield f"{prefix}{name}.lora_A.weight", pair.lora_A
                yield f"{prefix}{name}.lora_B.weight", pair.lora_B
        for i in range(self.num_layers):
            yield f"transformer_blocks.{i}.attn.{lora_format.BETA_NAME}", self.beta[i]  # a view of row i

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: both LoRA sets and beta."""
        return list(self.lora.parameters()) + [self.beta]

    def export_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Both LoRA sets and beta as detached copies, named as in the module docstring."""
        return {k: p.detach().clone() for k, p in self.named_lora_parameters()}

    def lora_grad_state_dict(self) -> dict[str, torch.Tensor]:
        """The gradients of the LoRA sets and beta, in the export naming (zeros where autograd left None)."""
        out = {}
        for key, p in self.named_lora_parameters():
            if key.endswith(lora_format.BETA_NAME):
                g = self.beta.grad
                out[key] = torch.zeros_like(p) if g is None else g[int(key.split(".")[1])].clone()
            else:
                out[key] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        return out

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.named_lora_parameters()}

    def load_lora_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy a state dict in the export naming (torch or numpy values) into both LoRA sets and beta.

        Every key must be present with its shape: a wrong rank or another model is refused, naming the keys.
        """
        expected = self._expected_shapes()
        missing = [k for k in expected if k not in state_dict]
        misshaped = [f"{k} {tuple(state_dict[k].shape)} (expected {want})" for k, want in expected.items()
                     if k in state_dict and tuple(state_dict[k].shape) != want]
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected or misshaped:
            ranks = sorted({tuple(state_dict[k].shape)[0] for k in expected
                            if k in state_dict and k.endswith(".lora_A.weight")})
            hint = (f" (LoRA rank {self.lora_config.rank} expected, the state dict has rank "
                    f"{', '.join(map(str, ranks))})") if ranks and ranks != [self.lora_config.rank] else ""
            raise lora_format.LoRAStateDictMismatch(f"the CustomShift LoRA state dict{hint}", missing, unexpected,
                                                    misshaped)
        with torch.no_grad():
            for key, p in self.named_lora_parameters():
                p.copy_(torch.from_numpy(np.array(to_numpy(state_dict[key]), copy=True)))

    def load_lora_from_jax(self, rab_lora: Mapping, cgb_lora: Mapping) -> None:
        """Load the JAX LoRA trees (RAB; CGB with beta) through `customshift_jax.io.lora_files` (exact)."""
        if rab_lora is None or cgb_lora is None:
            raise ValueError("load_lora_from_jax needs both trees (RAB and CGB); use init_lora for a fresh one.")
        sd = lora_format.to_state_dict(rab_lora, cgb_lora)
        lora_format.check_lora_state_dict(self.config, self.lora_config,
                                          {k: v for k, v in sd.items() if k.startswith(lora_format.RAB_PREFIX)},
                                          branch="rab", prefix=lora_format.RAB_PREFIX)
        lora_format.check_lora_state_dict(self.config, self.lora_config,
                                          {k: v for k, v in sd.items() if not k.startswith(lora_format.RAB_PREFIX)},
                                          branch="cgb")
        self.load_lora_state_dict(sd)


__all__ = ["TorchCustomShift", "CustomShiftAttnProcessor", "cads_attention", "LoRAPair"]
