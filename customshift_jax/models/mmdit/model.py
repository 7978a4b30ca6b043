"""The SD3 / SD3.5 MMDiT (diffusers' `SD3Transformer2DModel`) in Flax Linen.

Blocks of one structure are stacked and run with `nn.scan`, so compile time does not grow with depth;
runs of differing blocks (SD3.5 dual attention, the `context_pre_only` last block) are their own groups.
Every module takes the config (what the model is) and one `RunOptions` (how it runs). The joint attention
calls the injected processor (`RunOptions.processor`) with this layer's slice of `processor_per_layer` and
with `processor_shared`; `returns="kv"` gives each layer's joint-attention K/V instead of the sample. That is
all a variant needs (CustomShift's branches, in `customshift_jax.customshift`); the model knows none.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.models.mmdit.attention import attention
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from customshift_jax.models.mmdit.layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    Dense,
    FeedForward,
    RMSNorm,
    layer_norm,
    modulate,
)
from customshift_jax.models.mmdit.options import ActivationHook, RunOptions

BOUNDARY_AXES = ("batch", "length", "embed")  # logical axes of the carry x (B, N, D) and c (B, M, D)


def constrain(hook: ActivationHook | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Apply the block-boundary sharding hook to each (B, tokens, width) array; no hook: unchanged."""
    return arrays if hook is None else tuple(hook(a, BOUNDARY_AXES) for a in arrays)


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _kw(options: RunOptions, with_lora: bool = True) -> dict[str, Any]:
    """The leaf layers' keyword arguments from the run options (norms and embedders take no LoRA)."""
    kw: dict[str, Any] = dict(dtype=options.dtype, param_dtype=options.param_dtype)
    return {**kw, "lora_config": options.lora_config} if with_lora else kw


class ToOut(nn.Module):
    """diffusers' `to_out` ModuleList: `0` is the output Linear (`1` is dropout, no params)."""

    features: int
    options: RunOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(self.features, name="0", **_kw(self.options))(x)


class Attention(nn.Module):
    """diffusers' `Attention`: the image stream, plus the text stream when `joint` (then through the injected
    processor; the image-only `attn2` of SD3.5 is plain attention).

    Returns (image_out, text_out, kv): text_out is None when not `joint` or `context_pre_only`; kv is the
    (K, V) of all tokens [x; c] after qk-norm, (B, N+M, H, D) each, when the options return "kv", else None.
    """

    heads: int
    head_dim: int
    qk_norm: str | None
    joint: bool
    options: RunOptions
    context_pre_only: bool = False

    def _proj(self, name: str, x: jax.Array) -> jax.Array:
        y = Dense(self.heads * self.head_dim, name=name, **_kw(self.options))(x)
        return y.reshape(*x.shape[:-1], self.heads, self.head_dim)  # (B, N, H, D)

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        return RMSNorm(param_dtype=self.options.param_dtype, name=name)(x) if self.qk_norm == "rms_norm" else x

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array | None = None, *, per_layer: Any = None, shared: Any = None):
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
            out = self.options.processor(self, q, k, v, n_img=n_img, per_layer=per_layer, shared=shared)
        else:
            out = attention(q, k, v, backend=self.options.backend,
                            kernel_layout=self.options.kernel_layout)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)  # (B, Nq, H*D)
        img_out = ToOut(dim, self.options, name="to_out")(out[:, :n_img])
        kv = (k, v) if self.options.emit_kv else None
        if not self.joint or self.context_pre_only:
            return img_out, None, kv
        return img_out, Dense(dim, name="to_add_out", **_kw(self.options))(out[:, n_img:]), kv


class JointTransformerBlock(nn.Module):
    """diffusers' `JointTransformerBlock` (optionally dual attention, optionally `context_pre_only`).

    Written as a scan body: carry (x (B, N, D), c (B, M, D)); scanned `skip` flag and this layer's processor
    input (or None); broadcast temb (B, D) and the processor's shared input. Emits (per-block outputs, K/V) as
    the options ask.
    """

    config: MMDiTConfig
    use_dual_attention: bool
    context_pre_only: bool
    options: RunOptions

    @nn.compact
    def __call__(self, carry, skip: jax.Array, per_layer, temb: jax.Array, shared):
        x, c = carry
        cfg, options = self.config, self.options
        kw = _kw(options, with_lora=False)  # norms: no LoRA
        dim = cfg.inner_dim
        attn_kw = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, qk_norm=cfg.qk_norm,
                       options=options)

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
            norm_x, norm_c, per_layer=per_layer, shared=shared)
        new_x = x + gate_msa * attn_x
        if self.use_dual_attention:  # image-only self-attention
            attn2_x, _, _ = Attention(joint=False, name="attn2", **attn_kw)(modulate(x_normed, shift_msa2,
                                                                                     scale_msa2))
            new_x = new_x + gate_msa2 * attn2_x
        ff_in = modulate(layer_norm(new_x), shift_mlp, scale_mlp)
        new_x = new_x + gate_mlp * FeedForward(dim, name="ff", lora_config=options.lora_config, **kw)(ff_in)

        if self.context_pre_only:
            new_c = c  # diffusers returns None; the last block's text stream is not used again
        else:
            new_c = c + c_gate_msa * attn_c
            ff_c_in = modulate(layer_norm(new_c), c_shift_mlp, c_scale_mlp)
            ff_context = FeedForward(dim, name="ff_context", lora_config=options.lora_config, **kw)
            new_c = new_c + c_gate_mlp * ff_context(ff_c_in)

        # skip_layers: a skipped block passes its inputs through unchanged.
        new_x = jnp.where(skip, x, new_x)
        new_c = jnp.where(skip, c, new_c)
        new_x, new_c = constrain(options.activation_sharding, new_x, new_c)
        return (new_x, new_c), ((new_x, new_c) if options.collect_outputs else None, kv)


class BlockGroup(nn.Module):
    """A run of blocks of one structure, stacked on a leading `layers` axis and run with `nn.scan`."""

    config: MMDiTConfig
    length: int
    use_dual_attention: bool
    context_pre_only: bool
    options: RunOptions

    @nn.compact
    def __call__(self, x, c, skip, per_layer, temb, shared):
        block_cls = JointTransformerBlock
        if self.options.remat != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.options.remat], prevent_cse=False)
        # "intermediates": what a processor sows (e.g. a probe's per-layer statistics) stacks on the layer axis.
        scanned = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0, "intermediates": 0},
                          split_rngs={"params": True},
                          in_axes=(0, 0, nn.broadcast, nn.broadcast), length=self.length)
        body = scanned(config=self.config, use_dual_attention=self.use_dual_attention,
                       context_pre_only=self.context_pre_only, options=self.options, name="scan")
        (x, c), (per_block, kv) = body((x, c), skip, per_layer, temb, shared)
        return x, c, per_block, kv  # kv: (K, V) each (L, B, N+M, H, D) when the options return "kv"


def group_name(start: int, stop: int) -> str:
    """Param-tree name of the group of blocks [start, stop): e.g. "0:13"."""
    return f"{start}:{stop}"


class TransformerBlocks(nn.Module):
    """diffusers' `transformer_blocks`, held as groups of scanned blocks named by their index ranges."""

    config: MMDiTConfig
    options: RunOptions

    @nn.compact
    def __call__(self, x, c, temb, skip_mask, per_layer=None, shared=None):
        """per_layer: {group name: pytree with a leading layers axis} (e.g. the K/V that `returns="kv"` gave),
        or None. Returns x, c, per-block outputs, {group name: K/V}."""
        per_block, kv_cache = [], {}
        for start, stop in self.config.block_groups():
            name = group_name(start, stop)
            dual, pre_only = self.config.block_kind(start)
            group = BlockGroup(self.config, stop - start, dual, pre_only, self.options, name=name)
            layer_inputs = None if per_layer is None else per_layer[name]
            x, c, outs, kv = group(x, c, skip_mask[start:stop], layer_inputs, temb, shared)
            per_block.append(outs)
            kv_cache[name] = kv
        return x, c, per_block, kv_cache


class SD3Transformer(nn.Module):
    """The whole forward of `SD3Transformer2DModel`: latents (B, C, H, W) -> what `options.returns` names:
    the sample (B, C_out, H, W), (sample, per-block outputs), or {group: (K, V)} of every layer.

    `processor_per_layer` ({group: pytree with a leading layers axis}) and `processor_shared` go to the joint
    attention processor unread by the model (CustomShift passes the reference cache and gamma).
    """

    config: MMDiTConfig
    options: RunOptions = RunOptions()

    @nn.compact
    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, skip_mask,
                 processor_per_layer=None, processor_shared=None):
        cfg, options = self.config, self.options
        kw = _kw(options, with_lora=False)
        _, _, height, width = hidden_states.shape
        x = PatchEmbed(cfg.inner_dim, cfg.patch_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size,
                       name="pos_embed", **kw)(hidden_states)
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, name="time_text_embed", **kw)(
            timestep, pooled_projections)
        c = Dense(cfg.caption_projection_dim, name="context_embedder", **kw)(encoder_hidden_states)
        blocks = TransformerBlocks(cfg, options, name="transformer_blocks")
        x, c = constrain(options.activation_sharding, x, c)
        x, c, per_block, kv_cache = blocks(x, c, temb, skip_mask, processor_per_layer, processor_shared)
        if options.emit_kv and not self.is_initializing():
            return kv_cache
        x = AdaLayerNormContinuous(name="norm_out", **kw)(x, temb)
        x = Dense(cfg.patch_size * cfg.patch_size * cfg.out_channels, name="proj_out", **kw)(x)
        sample = unpatchify(x, height, width, cfg.patch_size, cfg.out_channels)
        return (sample, per_block) if options.collect_outputs else sample


def unpatchify(x: jax.Array, height: int, width: int, p: int, channels: int) -> jax.Array:
    """(B, N, p*p*C) -> (B, C, H, W), as diffusers' `nhwpqc->nchpwq`."""
    b = x.shape[0]
    x = x.reshape(b, height // p, width // p, p, p, channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, channels, height, width)

