"""The SD3 / SD3.5 MMDiT (diffusers' `SD3Transformer2DModel`) in Flax Linen, with the CustomShift hooks.

Blocks of one structure are stacked and run with `nn.scan`, so compile time does not grow with depth;
runs of differing blocks (SD3.5 dual attention, the `context_pre_only` last block) are their own groups.
The same blocks serve both CustomShift branches (DESIGN section 4): with `emit_kv` a pass returns each
layer's joint-attention K/V (the Reference-Alignment Branch prefill); given a per-layer reference cache,
the image queries read it through the attention distribution shift (the Cross-Guidance Branch).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.attention import attention
from customshift_jax.cads import cads_attention, shift_logit
from customshift_jax.config import MMDiTConfig
from customshift_jax.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from customshift_jax.layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    Dense,
    Dtype,
    FeedForward,
    RMSNorm,
    layer_norm,
    modulate,
)
from customshift_jax.lora import LoRAConfig

# Sharding hook at block boundaries: `hook(x, logical_axes) -> x`, e.g. a `with_sharding_constraint` by rules.
ActivationHook = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
BOUNDARY_AXES = ("batch", "length", "embed")  # logical axes of the carry x (B, N, D) and c (B, M, D)


def constrain(hook: ActivationHook | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Apply the block-boundary sharding hook to each (B, tokens, width) array; no hook: unchanged."""
    return arrays if hook is None else tuple(hook(a, BOUNDARY_AXES) for a in arrays)


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ToOut(nn.Module):
    """diffusers' `to_out` ModuleList: `0` is the output Linear (`1` is dropout, no params)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, name="0")(x)


class Attention(nn.Module):
    """diffusers' `Attention` with `JointAttnProcessor2_0`: image stream, plus the text stream when `joint`.

    Returns (image_out, text_out, kv): text_out is None when not `joint` or `context_pre_only`; kv is the
    (K, V) of all tokens [x; c] after qk-norm, (B, N+M, H, D) each, when `emit_kv`, else None. Given
    `ref_kv` and `lam`, the image queries also read the reference through the CADS merge.
    """

    heads: int
    head_dim: int
    qk_norm: str | None
    joint: bool
    context_pre_only: bool = False
    backend: str = "xla"
    cads_form: str = "two_pass"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRAConfig | None = None

    def _proj(self, name: str, x: jax.Array) -> jax.Array:
        y = Dense(self.heads * self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                  name=name)(x)
        return y.reshape(*x.shape[:-1], self.heads, self.head_dim)  # (B, N, H, D)

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        return RMSNorm(param_dtype=self.param_dtype, name=name)(x) if self.qk_norm == "rms_norm" else x

    def beta(self) -> jax.Array:
        """The learned CADS shift (H,) from the "lora" collection of the Cross-Guidance Branch; 0 if absent."""
        creating = self.is_initializing() and self.lora is not None and self.lora.with_beta
        if creating or self.has_variable("lora", "beta"):  # read whenever the branch's tree carries it
            return self.variable("lora", "beta", lambda: jnp.zeros((self.heads,), jnp.float32)).value
        return jnp.zeros((self.heads,), jnp.float32)

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array | None = None, *, ref_kv=None, gamma=None, shift: str = "cads",
                 emit_kv: bool = False):
        dim = x.shape[-1]
        q = self._norm("norm_q", self._proj("to_q", x))
        k = self._norm("norm_k", self._proj("to_k", x))
        v = self._proj("to_v", x)
        n_img = x.shape[1]
        if self.joint:
            cq = self._norm("norm_added_q", self._proj("add_q_proj", c))
            ck = self._norm("norm_added_k", self._proj("add_k_proj", c))
            cv = self._proj("add_v_proj", c)
            k = jnp.concatenate([k, ck], axis=1)
            v = jnp.concatenate([v, cv], axis=1)
            if not self.context_pre_only:  # the last block's text queries are never used
                q = jnp.concatenate([q, cq], axis=1)
        lam = shift_logit(self.beta(), 1.0 if gamma is None else gamma, shift) if self.joint else None
        if ref_kv is None:
            out = attention(q, k, v, backend=self.backend)
        else:
            out = cads_attention(q, k, v, ref_kv[0], ref_kv[1], lam, n_img, form=self.cads_form,
                                 backend=self.backend)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)  # (B, Nq, H*D)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        img_out = ToOut(dim, name="to_out", **kw)(out[:, :n_img])
        kv = (k, v) if emit_kv else None
        if not self.joint or self.context_pre_only:
            return img_out, None, kv
        return img_out, Dense(dim, name="to_add_out", **kw)(out[:, n_img:]), kv


class JointTransformerBlock(nn.Module):
    """diffusers' `JointTransformerBlock` (optionally dual attention, optionally `context_pre_only`).

    Written as a scan body: carry (x (B, N, D), c (B, M, D)); scanned `skip` flag and per-layer reference
    K/V (or None); broadcast temb (B, D) and gamma. Emits (per-block outputs, K/V) as requested.
    """

    config: MMDiTConfig
    use_dual_attention: bool
    context_pre_only: bool
    backend: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    collect_outputs: bool = False
    lora: LoRAConfig | None = None
    emit_kv: bool = False
    shift: str = "cads"
    cads_form: str = "two_pass"
    activation_sharding: ActivationHook | None = None

    @nn.compact
    def __call__(self, carry, skip: jax.Array, ref_kv, temb: jax.Array, gamma):
        x, c = carry
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)  # norms: no LoRA
        dim = cfg.inner_dim
        attn_kw = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, qk_norm=cfg.qk_norm,
                       backend=self.backend, cads_form=self.cads_form, lora=self.lora, **kw)

        if self.use_dual_attention:
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
             shift_msa2, scale_msa2, gate_msa2) = AdaLayerNormZero(9, name="norm1", **kw)(temb)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(
                6, name="norm1", **kw)(temb)
        x_normed = layer_norm(x)
        norm_x = modulate(x_normed, shift_msa, scale_msa)

        if self.context_pre_only:
            norm_c = AdaLayerNormContinuous(name="norm1_context", **kw)(c, temb)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
                6, name="norm1_context", **kw)(temb)
            norm_c = modulate(layer_norm(c), c_shift_msa, c_scale_msa)

        attn_x, attn_c, kv = Attention(joint=True, context_pre_only=self.context_pre_only, name="attn", **attn_kw)(
            norm_x, norm_c, ref_kv=ref_kv, gamma=gamma, shift=self.shift, emit_kv=self.emit_kv)
        new_x = x + gate_msa * attn_x
        if self.use_dual_attention:  # image-only self-attention: never reads the reference
            attn2_x, _, _ = Attention(joint=False, name="attn2", **attn_kw)(modulate(x_normed, shift_msa2,
                                                                                     scale_msa2))
            new_x = new_x + gate_msa2 * attn2_x
        ff_in = modulate(layer_norm(new_x), shift_mlp, scale_mlp)
        new_x = new_x + gate_mlp * FeedForward(dim, name="ff", lora=self.lora, **kw)(ff_in)

        if self.context_pre_only:
            new_c = c  # diffusers returns None; the last block's text stream is not used again
        else:
            new_c = c + c_gate_msa * attn_c
            ff_c_in = modulate(layer_norm(new_c), c_shift_mlp, c_scale_mlp)
            new_c = new_c + c_gate_mlp * FeedForward(dim, name="ff_context", lora=self.lora, **kw)(ff_c_in)

        # skip_layers: a skipped block passes its inputs through unchanged.
        new_x = jnp.where(skip, x, new_x)
        new_c = jnp.where(skip, c, new_c)
        new_x, new_c = constrain(self.activation_sharding, new_x, new_c)
        return (new_x, new_c), ((new_x, new_c) if self.collect_outputs else None, kv)


class BlockGroup(nn.Module):
    """A run of blocks of one structure, stacked on a leading `layers` axis and run with `nn.scan`."""

    config: MMDiTConfig
    length: int
    use_dual_attention: bool
    context_pre_only: bool
    backend: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    collect_outputs: bool = False
    lora: LoRAConfig | None = None
    emit_kv: bool = False
    shift: str = "cads"
    cads_form: str = "two_pass"
    activation_sharding: ActivationHook | None = None

    @nn.compact
    def __call__(self, x, c, skip, ref_kv, temb, gamma):
        block_cls = JointTransformerBlock
        if self.remat != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        scanned = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                          in_axes=(0, 0, nn.broadcast, nn.broadcast), length=self.length)
        body = scanned(config=self.config, use_dual_attention=self.use_dual_attention,
                       context_pre_only=self.context_pre_only, backend=self.backend, dtype=self.dtype,
                       param_dtype=self.param_dtype, collect_outputs=self.collect_outputs, lora=self.lora,
                       emit_kv=self.emit_kv, shift=self.shift, cads_form=self.cads_form,
                       activation_sharding=self.activation_sharding, name="scan")
        (x, c), (per_block, kv) = body((x, c), skip, ref_kv, temb, gamma)
        return x, c, per_block, kv  # kv: (K, V) each (L, B, N+M, H, D) when emit_kv


def group_name(start: int, stop: int) -> str:
    """Param-tree name of the group of blocks [start, stop): e.g. "0:13"."""
    return f"{start}:{stop}"


class TransformerBlocks(nn.Module):
    """diffusers' `transformer_blocks`, held as groups of scanned blocks named by their index ranges."""

    config: MMDiTConfig
    backend: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    collect_outputs: bool = False
    lora: LoRAConfig | None = None
    emit_kv: bool = False
    shift: str = "cads"
    cads_form: str = "two_pass"
    activation_sharding: ActivationHook | None = None

    @nn.compact
    def __call__(self, x, c, temb, skip_mask, ref_cache=None, gamma=None):
        """ref_cache: {group name: (K, V)} as `emit_kv` returned it, or None. Returns x, c, outputs, kv."""
        per_block, kv_cache = [], {}
        for start, stop in self.config.block_groups():
            name = group_name(start, stop)
            dual, pre_only = self.config.block_kind(start)
            group = BlockGroup(self.config, stop - start, dual, pre_only, self.backend, self.remat, self.dtype,
                               self.param_dtype, self.collect_outputs, self.lora, self.emit_kv, self.shift,
                               self.cads_form, self.activation_sharding, name=name)
            ref_kv = None if ref_cache is None else ref_cache[name]
            x, c, outs, kv = group(x, c, skip_mask[start:stop], ref_kv, temb, gamma)
            per_block.append(outs)
            kv_cache[name] = kv
        return x, c, per_block, kv_cache


class SD3Transformer(nn.Module):
    """The whole forward of `SD3Transformer2DModel`: latents (B, C, H, W) -> sample (B, C_out, H, W).

    With `emit_kv` it returns instead the per-group joint-attention K/V of every layer (the RAB prefill);
    given `ref_cache` (and `gamma`) the image queries read the reference (the CGB forward).
    """

    config: MMDiTConfig
    backend: str = "xla"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    collect_outputs: bool = False
    lora: LoRAConfig | None = None
    emit_kv: bool = False
    shift: str = "cads"
    cads_form: str = "two_pass"
    activation_sharding: ActivationHook | None = None

    @nn.compact
    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, skip_mask,
                 ref_cache=None, gamma=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, _, height, width = hidden_states.shape
        x = PatchEmbed(cfg.inner_dim, cfg.patch_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size,
                       name="pos_embed", **kw)(hidden_states)
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, name="time_text_embed", **kw)(
            timestep, pooled_projections)
        c = Dense(cfg.caption_projection_dim, name="context_embedder", **kw)(encoder_hidden_states)
        blocks = TransformerBlocks(cfg, self.backend, self.remat, self.dtype, self.param_dtype, self.collect_outputs,
                                   self.lora, self.emit_kv, self.shift, self.cads_form, self.activation_sharding,
                                   name="transformer_blocks")
        x, c = constrain(self.activation_sharding, x, c)
        x, c, per_block, kv_cache = blocks(x, c, temb, skip_mask, ref_cache, gamma)
        if self.emit_kv and not self.is_initializing():
            return kv_cache
        x = AdaLayerNormContinuous(name="norm_out", **kw)(x, temb)
        x = Dense(cfg.patch_size * cfg.patch_size * cfg.out_channels, name="proj_out", **kw)(x)
        sample = unpatchify(x, height, width, cfg.patch_size, cfg.out_channels)
        return (sample, per_block) if self.collect_outputs else sample


def unpatchify(x: jax.Array, height: int, width: int, p: int, channels: int) -> jax.Array:
    """(B, N, p*p*C) -> (B, C, H, W), as diffusers' `nhwpqc->nchpwq`."""
    b = x.shape[0]
    x = x.reshape(b, height // p, width // p, p, p, channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, channels, height, width)

