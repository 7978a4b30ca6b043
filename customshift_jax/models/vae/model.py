"""Flax Linen modules of diffusers' `AutoencoderKL` (SD3's VAE), computed in NHWC.

Submodule names follow diffusers' module names, lists included ("down_blocks", "0", "resnets", "1", ...),
so the torch key `decoder.up_blocks.0.resnets.1.conv1.weight` is the flax path
('decoder', 'up_blocks', '0', 'resnets', '1', 'conv1', 'kernel'). GroupNorm and softmax run in fp32
whatever `dtype` is.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.models.mmdit.attention import attention
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.tree_paths import named_leaves

Dtype = Any
Array = jax.Array

_EPS = 1e-6  # diffusers' VAE: every GroupNorm (resnets, attention, conv_norm_out) uses eps 1e-6


class _Numbered(nn.Module):
    """A torch `nn.ModuleList` look-alike: children named "0", "1", ... so param paths spell diffusers' keys.

    `make(i, name)` builds child i; calling with `index=None` runs all children in order, else child `index`.
    """

    make: Callable[[int, str], nn.Module]
    count: int

    def setup(self) -> None:
        self.items = [self.make(i, str(i)) for i in range(self.count)]

    def __call__(self, x: Array, index: int | None = None) -> Array:
        if index is not None:
            return self.items[index](x)
        for item in self.items:
            x = item(x)
        return x


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm (affine) on NHWC, in fp32: biased variance over (H, W, channels of the group)."""

    num_groups: int
    eps: float = _EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, H, W, C)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)  # (B,H,W,G,C/G)
        axes = (*range(1, x.ndim - 1), x.ndim)  # spatial axes and the channels within a group
        mean = jnp.mean(g, axis=axes, keepdims=True)
        centered = g - mean
        var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
        y = (centered * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, *, stride: int = 1,
          padding: Any = None) -> nn.Conv:
    """A torch-style Conv2d in NHWC: `padding` defaults to kernel // 2 on every side (torch's padding=k//2)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D without time embedding: GN-SiLU-conv, GN-SiLU-conv, plus a 1x1 shortcut when widths differ."""

    in_channels: int
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, Cin) -> (B, H, W, Cout)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, name="norm1", **kw)(x))
        h = _conv(self.out_channels, 3, "conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, name="norm2", **kw)(h))
        h = _conv(self.out_channels, 3, "conv2", **kw)(h)  # dropout p=0 in diffusers' VAE: identity
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h  # diffusers divides by output_scale_factor = 1.0: exact no-op


class Downsample2D(nn.Module):
    """diffusers' Downsample2D(padding=0): zero-pad bottom and right by 1, then a 3x3 stride-2 conv, no padding."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, floor((H-2)/2)+1, ..., C)
        conv = _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=((0, 1), (0, 1)))
        return conv(x)


class UpsampledConv(nn.Module):
    """A 3x3 conv (padding 1) of x upsampled x2 by nearest neighbour, computed on x itself: each of the four
    output phases is a 2x2 conv of x whose taps are sums of the 3x3 taps (2.25x fewer FLOPs, no upsampled copy).

    Its params are the 3x3 conv's (`kernel` (3, 3, Cin, Cout), `bias`), so it stands in for `nn.Conv` unchanged."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, Cin) -> (B, 2H, 2W, Cout)
        b, h, w, cin = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype)
        phases = []  # (B, H, W, Cout) for output rows 2i + a, columns 2j + c; a, c in (0, 1)
        for a, rows in enumerate(_phase_taps(kernel, axis=0)):  # taps summed in the params' dtype, then cast
            for c, taps in enumerate(_phase_taps(rows, axis=1)):
                pad = ((1 - a, a), (1 - c, c))  # phase 0 reads pixels (i - 1, i), phase 1 (i, i + 1)
                phases.append(jax.lax.conv_general_dilated(x, taps.astype(x.dtype), (1, 1), pad,
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
        out = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, self.features)  # (B, H, W, a, c, Cout)
        return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.features) + bias


def _phase_taps(kernel: Array, axis: int) -> tuple[Array, Array]:
    """Along `axis`, the 3 taps (t0, t1, t2) of a conv on a nearest-x2 upsampling as two 2-tap kernels of the
    original: output phase 0 reads pixels (i - 1, i) with (t0, t1 + t2), phase 1 reads (i, i + 1) with (t0 + t1, t2)."""
    t0, t1, t2 = jnp.split(kernel, 3, axis=axis)
    return jnp.concatenate([t0, t1 + t2], axis), jnp.concatenate([t0 + t1, t2], axis)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D(use_conv=True): nearest-neighbour x2, then a 3x3 conv (one `UpsampledConv`)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, 2H, 2W, C)
        return UpsampledConv(self.channels, self.dtype, self.param_dtype, name="conv")(x)


class SpatialSelfAttention(nn.Module):
    """The mid block's diffusers `Attention`: GroupNorm, one head of width C over the H*W tokens, to_out.0,
    plus the residual (rescale_output_factor 1.0). Logits and softmax in fp32."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, H, W, C)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        hs = GroupNorm(self.groups, name="group_norm", **kw)(x).reshape(b, h * w, c)  # (B, N, C)
        q = nn.Dense(c, name="to_q", **kw)(hs)
        k = nn.Dense(c, name="to_k", **kw)(hs)
        v = nn.Dense(c, name="to_v", **kw)(hs)
        # one head over the N tokens, blocks of queries at a time: (B, block, N) logits, not (B, N, N)
        out = attention(q[:, :, None], k[:, :, None], v[:, :, None], backend="blocked")[:, :, 0]  # (B, N, C)
        to_out = _Numbered(lambda i, name: nn.Dense(c, name=name, **kw), 1, name="to_out")  # to_out.1 is dropout
        out = to_out(out).reshape(b, h, w, c)
        return out + x


class UNetMidBlock2D(nn.Module):
    """diffusers' UNetMidBlock2D with one layer: resnets.0, attentions.0 (optional), resnets.1."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, H, W, C) -> (B, H, W, C)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, g = self.channels, self.groups
        resnets = _Numbered(lambda i, name: ResnetBlock2D(c, c, g, name=name, **kw), 2, name="resnets")
        x = resnets(x, 0)
        if self.add_attention:
            attentions = _Numbered(lambda i, name: SpatialSelfAttention(c, g, name=name, **kw), 1, name="attentions")
            x = attentions(x, 0)
        return resnets(x, 1)


class DownEncoderBlock2D(nn.Module):
    """diffusers' DownEncoderBlock2D: `num_layers` resnets, then a Downsample2D unless it is the last block."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cin, cout, g = self.in_channels, self.out_channels, self.groups
        x = _Numbered(lambda i, name: ResnetBlock2D(cin if i == 0 else cout, cout, g, name=name, **kw),
                      self.num_layers, name="resnets")(x)
        if self.add_downsample:
            x = _Numbered(lambda i, name: Downsample2D(cout, name=name, **kw), 1, name="downsamplers")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers' UpDecoderBlock2D: `num_layers` resnets, then an Upsample2D unless it is the last block."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cin, cout, g = self.in_channels, self.out_channels, self.groups
        x = _Numbered(lambda i, name: ResnetBlock2D(cin if i == 0 else cout, cout, g, name=name, **kw),
                      self.num_layers, name="resnets")(x)
        if self.add_upsample:
            x = _Numbered(lambda i, name: Upsample2D(cout, name=name, **kw), 1, name="upsamplers")(x)
        return x


class Encoder(nn.Module):
    """diffusers' vae.Encoder with double_z: image (B, H, W, 3) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv(widths[0], 3, "conv_in", **kw)(x)

        def block(i: int, name: str) -> nn.Module:
            return DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, g,
                                      add_downsample=i < len(widths) - 1, name=name, **kw)

        x = _Numbered(block, len(widths), name="down_blocks")(x)
        x = UNetMidBlock2D(widths[-1], g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(g, name="conv_norm_out", **kw)(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' vae.Decoder: latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = _conv(rev[0], 3, "conv_in", **kw)(z)
        x = UNetMidBlock2D(rev[0], g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)

        def block(i: int, name: str) -> nn.Module:
            return UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g,
                                    add_upsample=i < len(rev) - 1, name=name, **kw)

        x = _Numbered(block, len(rev), name="up_blocks")(x)
        x = nn.silu(GroupNorm(g, name="conv_norm_out", **kw)(x))
        return _conv(cfg.out_channels, 3, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL without quant convs; params {'encoder': ..., 'decoder': ...}, NHWC in and out."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype)

    def encode_moments(self, x: Array) -> tuple[Array, Array]:
        """(B, H, W, Cin) -> mean, logvar (B, h, w, latent_channels); logvar clamped to [-30, 20] as diffusers."""
        moments = self.encoder(x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """(B, h, w, latent_channels) -> (B, H, W, out_channels), the raw decoder output."""
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        """Encode to the mean and decode it; used to create every parameter at init."""
        mean, _ = self.encode_moments(x)
        return self.decode(mean)


@functools.lru_cache(maxsize=16)
def param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every param path of `AutoencoderKL(config)` and its shape, computed abstractly (no FLOPs, no memory)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    abstract = jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x), x)["params"]
    return {path: tuple(leaf.shape) for path, leaf in named_leaves(abstract)}
