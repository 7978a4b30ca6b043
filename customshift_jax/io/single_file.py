"""Original single-file SD3 / SD3.5 checkpoints (as Stability ships them) <-> diffusers key names.

The MMDiT lives under `model.diffusion_model.` (`joint_blocks.N.x_block/context_block`, fused `qkv`,
`adaLN_modulation.1`, `final_layer`, `x_/t_/y_embedder`, `pos_embed`), the VAE under `first_stage_model.`
(LDM names: `down.N.block.M`, `mid.attn_1`, 1x1-conv attention). Text encoders (`text_encoders.*`) are
not converted here. A file carries no config, so `infer_*_config` reads the architecture from the shapes.
Two layouts differ beyond names: the original fuses q, k, v into one `qkv` tensor, and orders the
AdaLN-Continuous modulation (final layer, last block's context stream) as (shift, scale), not (scale, shift).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.mmdit.mapping import state_dict_shapes, to_numpy
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.model import param_shapes

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = ("text_encoders.", "cond_stage_model.", "conditioner.")
SD3_HEAD_DIM = 64  # every SD3 / SD3.5 release; qk-norm weights state it exactly when present


@dataclasses.dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the original file: its shape, and the diffusers keys it holds (3 for a fused qkv)."""

    key: str
    shape: tuple[int, ...]
    members: tuple[str, ...]
    swap: bool = False  # (shift, scale) halves in the original, (scale, shift) in diffusers
    squeeze: int = 0  # trailing 1-sized axes the original has (VAE 1x1-conv attention) and diffusers not


# ---------------------------------------------------------------------------------------------------
# MMDiT


_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# diffusers module inside transformer_blocks.N -> (original module inside joint_blocks.N, index in a fused qkv)
_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.norm_q": ("x_block.attn.ln_q", None), "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None), "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.norm_q": ("x_block.attn2.ln_q", None), "attn2.norm_k": ("x_block.attn2.ln_k", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
}
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def original_transformer_key(key: str, config: MMDiTConfig) -> tuple[str, int | None, bool]:
    """diffusers key -> (original key without prefix, index in a fused qkv or None, swap scale/shift)."""
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        original, part = _BLOCK[module]
        swap = module == "norm1_context.linear" and config.block_kind(index)[1]  # context_pre_only block
        return f"joint_blocks.{index}.{original}.{leaf}", part, swap
    if key == "pos_embed.pos_embed":
        return "pos_embed", None, False
    module, _, leaf = key.rpartition(".")
    return f"{_TOP_LEVEL[module]}.{leaf}", None, module == "norm_out.linear"


def transformer_layout(config: MMDiTConfig) -> dict[str, OriginalTensor]:
    """Every original tensor `config` needs (keys without prefix), its shape and the diffusers keys it holds."""
    groups: dict[str, list] = {}
    for key, shape in state_dict_shapes(config).items():
        original, part, swap = original_transformer_key(key, config)
        groups.setdefault(original, []).append((part, key, shape, swap))
    layout = {}
    for original, members in groups.items():
        members.sort(key=lambda m: -1 if m[0] is None else m[0])
        shape = members[0][2]
        if len(members) > 1:
            shape = (sum(m[2][0] for m in members),) + tuple(shape[1:])
        layout[original] = OriginalTensor(original, tuple(shape), tuple(m[1] for m in members), members[0][3])
    return layout


def swap_halves(array: np.ndarray) -> np.ndarray:
    """(a; b) -> (b; a) along axis 0: (shift, scale) <-> (scale, shift). Its own inverse."""
    half = array.shape[0] // 2
    return np.concatenate([array[half:], array[:half]], axis=0)


def transformer_to_original(config: MMDiTConfig, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A diffusers transformer state dict (numpy / torch) -> the original single-file tensors (no prefix).

    The inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`; used to write test files.
    """
    out = {}
    for original, t in transformer_layout(config).items():
        parts = [to_numpy(state_dict[k]) for k in t.members]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        out[original] = swap_halves(array) if t.swap else np.ascontiguousarray(array)
    return out


def infer_transformer_config(shapes: Mapping[str, tuple[int, ...]], what: str = "the checkpoint") -> MMDiTConfig:
    """Read the MMDiT architecture from original tensor shapes (keys without prefix).

    Layers, dual-attention layers and qk norm from the key names; widths, patch size and
    `pos_embed_max_size` from the shapes; head dim from the qk-norm weights, else 64 (all SD3 releases).
    """
    needed = ["pos_embed", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
              "final_layer.linear.weight"]
    absent = [k for k in needed if k not in shapes]
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")})
    if not blocks and "pos_embed" not in shapes:
        sample = ", ".join(sorted(shapes)[:5])
        raise ValueError(f"{what}: unknown architecture: no joint_blocks.* or pos_embed, so not an SD3 / SD3.5 MMDiT "
                         f"(an SD1 / SDXL UNet has input_blocks.*); found tensors like {sample}.")
    if absent or not blocks:
        listed = ", ".join(absent + ([] if blocks else ["joint_blocks.*"]))
        raise ValueError(f"{what}: cannot infer the MMDiT architecture: {listed} missing. Pass --config with the "
                         f"model's diffusers config.json (or a diffusers folder holding transformer/config.json).")
    ranks = {"pos_embed": 3, "x_embedder.proj.weight": 4, "context_embedder.weight": 2,
             "y_embedder.mlp.0.weight": 2, "final_layer.linear.weight": 2}
    odd = [f"{k} {tuple(shapes[k])}" for k, r in ranks.items() if len(shapes[k]) != r]
    if odd:
        raise ValueError(f"{what}: cannot infer the MMDiT architecture: unexpected ranks of {', '.join(odd)}; this "
                         f"is not an SD3 MMDiT as the file names suggest. Pass --config if it is one.")
    _, grid, inner = shapes["pos_embed"]
    max_size = math.isqrt(grid)
    inner_x, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    if max_size * max_size != grid or inner_x != inner:
        raise ValueError(f"{what}: pos_embed {tuple(shapes['pos_embed'])} is not a square grid of width "
                         f"{inner_x}; this is not an SD3 MMDiT. Pass --config if it is.")
    qk = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = qk[0] if qk else SD3_HEAD_DIM
    if inner % head_dim:
        raise ValueError(f"{what}: width {inner} is not a multiple of the head dim {head_dim} (SD3's); cannot infer "
                         f"the number of heads. Pass --config with the model's diffusers config.json.")
    out_channels = shapes["final_layer.linear.weight"][0] // (patch * patch)
    num_layers = blocks[-1] + 1
    missing_blocks = sorted(set(range(num_layers)) - set(blocks))
    if missing_blocks:
        raise ValueError(f"{what}: joint_blocks {missing_blocks[:20]} are missing (blocks go up to {num_layers - 1}); "
                         f"the file is incomplete.")
    dual = sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k})
    return MMDiTConfig(
        sample_size=128, patch_size=patch, in_channels=in_channels, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1], caption_projection_dim=inner,
        pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1], out_channels=out_channels,
        pos_embed_max_size=max_size, dual_attention_layers=tuple(dual),
        qk_norm="rms_norm" if qk else None,
    )


# ---------------------------------------------------------------------------------------------------
# VAE (LDM names)


def vae_state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every diffusers `AutoencoderKL` key `config` expects and its torch shape (flax path joined by '.',
    kernel/scale -> weight; conv (kh, kw, I, O) -> (O, I, kh, kw), dense (in, out) -> (out, in))."""
    out = {}
    for path, shape in param_shapes(config).items():
        leaf = "weight" if path[-1] in ("kernel", "scale") else path[-1]
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = (shape[1], shape[0])
        out[".".join((*path[:-1], leaf))] = tuple(shape)
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_vae_key(key: str, num_blocks: int) -> tuple[str, bool]:
    """diffusers VAE key -> (LDM key without prefix, whether the LDM tensor is a 1x1 conv of this linear)."""
    side, rest = key.split(".", 1)
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        kind, i, sub, j, tail = m.groups()
        level = int(i) if kind == "down" else num_blocks - 1 - int(i)  # LDM counts decoder levels bottom-up
        if sub == "resnets":
            return f"{side}.{kind}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}", False
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}", False
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}", False
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m:
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[m.group(1)]}.{m.group(2)}", m.group(1) != "group_norm"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.', 1)[1]}", False
    return key, False


def vae_layout(config) -> dict[str, OriginalTensor]:
    """Every LDM tensor an SD3 VAE of `config` needs (keys without prefix), shape and its diffusers key."""
    n = len(config.block_out_channels)
    layout = {}
    for key, shape in vae_state_dict_shapes(config).items():
        original, conv = original_vae_key(key, n)
        squeeze = 2 if conv and len(shape) == 2 else 0
        layout[original] = OriginalTensor(original, tuple(shape) + (1,) * squeeze, (key,), squeeze=squeeze)
    return layout


def vae_to_original(config, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A diffusers VAE state dict -> LDM single-file tensors (no prefix), attention as 1x1 convs; for tests."""
    out = {}
    for original, t in vae_layout(config).items():
        array = to_numpy(state_dict[t.members[0]])
        out[original] = np.ascontiguousarray(array.reshape(t.shape))
    return out


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], what: str = "the checkpoint"):
    """Read an SD3-style VAE architecture from LDM tensor shapes (keys without prefix).

    Widths, depth and channels come from the shapes; what no shape states (GroupNorm groups 32, latent
    scaling 1.5305 and shift 0.0609) is SD3's. `--config` overrides all of it.
    """
    needed = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    absent = [k for k in needed if k not in shapes]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    if absent or not levels:
        listed = ", ".join(absent + ([] if levels else ["encoder.down.*"]))
        raise ValueError(f"{what}: cannot infer the VAE architecture: {listed} missing. Pass --config with the "
                         f"VAE's diffusers config.json.")
    if "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        raise ValueError(f"{what}: the VAE has quant convs (an SD1/SDXL-style VAE); only SD3's VAE (16 latent "
                         f"channels, no quant convs) is supported.")
    widths = []
    for level in levels:
        key = f"encoder.down.{level}.block.0.conv1.weight"
        if key not in shapes:
            raise ValueError(f"{what}: {key} missing; cannot infer the VAE widths. Pass --config.")
        widths.append(shapes[key][0])
    per_block = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1], block_out_channels=tuple(widths),
        layers_per_block=per_block, mid_block_add_attention=any(".mid.attn_1." in k for k in shapes),
    )


# ---------------------------------------------------------------------------------------------------
# Reading a file through a layout


class OriginalView(Mapping):
    """diffusers key -> array, read lazily from an original file through a layout (no copy where a view
    suffices: a qkv third is a slice; a swapped modulation is one small copy, its pages released at once)."""

    def __init__(self, layout: Mapping[str, OriginalTensor], get: Callable[[str], np.ndarray],
                 release: Callable[[np.ndarray], None] = lambda a: None):
        self._get, self._release = get, release
        self._where: dict[str, tuple[OriginalTensor, int]] = {}
        for t in layout.values():
            for j, member in enumerate(t.members):
                self._where[member] = (t, j)

    def __getitem__(self, key: str) -> np.ndarray:
        t, j = self._where[key]
        array = self._get(t.key)
        if len(t.members) > 1:
            rows = array.shape[0] // len(t.members)
            array = array[j * rows:(j + 1) * rows]
        if t.squeeze:
            array = array.reshape(array.shape[:-t.squeeze])
        if t.swap:
            swapped = swap_halves(array)
            self._release(array)
            return swapped
        return array

    def shape(self, key: str) -> tuple[int, ...]:
        t, _ = self._where[key]
        shape = t.shape[:len(t.shape) - t.squeeze]
        return (shape[0] // len(t.members),) + tuple(shape[1:])

    def __contains__(self, key: object) -> bool:  # without reading (Mapping's default would read the tensor)
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def split_prefixes(keys: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """({component: keys}, text-encoder keys, unknown keys) of a single file's tensor names.

    A file of bare MMDiT names (`joint_blocks.*`, as some single-transformer files are) counts as transformer.
    """
    found: dict[str, list[str]] = {}
    text, unknown = [], []
    bare_mmdit = any(k.startswith("joint_blocks.") for k in keys)
    for key in keys:
        if key.startswith(TRANSFORMER_PREFIX):
            found.setdefault("transformer", []).append(key)
        elif key.startswith(VAE_PREFIX):
            found.setdefault("vae", []).append(key)
        elif key.startswith(TEXT_ENCODER_PREFIXES):
            text.append(key)
        elif bare_mmdit:
            found.setdefault("transformer", []).append(key)
        else:
            unknown.append(key)
    return found, text, unknown
