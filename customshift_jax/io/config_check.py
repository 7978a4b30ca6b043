"""The config of a stored model against its arrays: every dimension a shape determines is read back from the
shapes and compared with config.json, so a config that does not fit is refused at load with the field named;
and an exported safetensors file's header against the shapes diffusers builds from the exported config."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from customshift_jax.io.safetensors import SafetensorsFile
from customshift_jax.models.mmdit.api import param_shapes
from customshift_jax.models.mmdit.config import MMDiTConfig
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.model import param_shapes as vae_param_shapes
from customshift_jax.tree_paths import named_leaves

FIX = "config.json does not fit the stored weights: restore the config.json it was converted with, or re-run " \
      "`customshift convert`"


class ConfigMismatch(ValueError):
    """A config.json whose fields disagree with the shapes of the arrays stored beside it."""


def _shape(tree: Any, *path: str) -> tuple[int, ...] | None:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return None if isinstance(node, Mapping) else tuple(node.shape)


def _groups(tree: Mapping) -> list[tuple[int, int, Mapping]]:
    """(start, stop, scanned block params) of each stored block group "start:stop", in layer order."""
    out = []
    for name, group in (tree.get("transformer_blocks") or {}).items():
        start, _, stop = str(name).partition(":")
        if start.isdigit() and stop.isdigit() and isinstance(group, Mapping):
            out.append((int(start), int(stop), group.get("scan", group)))
    return sorted(out, key=lambda g: g[0])


def _transformer_misfits(c: MMDiTConfig, tree: Mapping) -> list[str]:
    """Sentences "config.json says X but <array> says Y" for each field the stored shapes contradict."""
    out = []
    groups = _groups(tree)
    attn = groups[0][2].get("attn", {}) if groups else {}
    heads = f"num_attention_heads={c.num_attention_heads} x attention_head_dim={c.attention_head_dim}"
    to_q = _shape(attn, "to_q", "kernel")  # (L, hidden, hidden)
    if to_q and to_q[-1] != c.inner_dim:
        out.append(f"config.json says {heads} (= {c.inner_dim}) but the to_q kernel is {to_q[1:]} "
                   f"({to_q[-1]} wide)")
    norm_q = _shape(attn, "norm_q", "scale")  # (L, head_dim)
    if norm_q and not c.qk_norm:
        out.append("config.json says qk_norm=None but the blocks store norm_q scales (qk_norm='rms_norm')")
    elif c.qk_norm and groups and norm_q is None:
        out.append(f"config.json says qk_norm={c.qk_norm!r} but the blocks store no norm_q scale")
    elif norm_q and norm_q[-1] != c.attention_head_dim:
        split = f" (heads x head_dim = {c.inner_dim // norm_q[-1]} x {norm_q[-1]})" if c.inner_dim % norm_q[-1] == 0 \
            else ""
        out.append(f"config.json says {heads} but norm_q scale has {norm_q[-1]} entries{split}")
    ctx = _shape(tree, "context_embedder", "kernel")  # (joint_attention_dim, caption_projection_dim)
    if ctx and ctx[0] != c.joint_attention_dim:
        out.append(f"config.json says joint_attention_dim={c.joint_attention_dim} but the context_embedder kernel "
                   f"is {ctx}: it takes {ctx[0]}-wide text embeddings")
    if ctx and ctx[1] != c.caption_projection_dim:
        out.append(f"config.json says caption_projection_dim={c.caption_projection_dim} but the context_embedder "
                   f"kernel is {ctx}")
    pooled = _shape(tree, "time_text_embed", "text_embedder", "linear_1", "kernel")  # (pooled, hidden)
    if pooled and pooled[0] != c.pooled_projection_dim:
        out.append(f"config.json says pooled_projection_dim={c.pooled_projection_dim} but the pooled text embedder "
                   f"kernel is {pooled}")
    if groups:
        layers = groups[-1][1]
        if layers != c.num_layers:
            out.append(f"config.json says num_layers={c.num_layers} but {layers} transformer blocks are stored")
        dual = [i for start, stop, g in groups if "attn2" in g for i in range(start, stop)]
        if dual != sorted(c.dual_attention_layers):
            out.append(f"config.json says dual_attention_layers={list(c.dual_attention_layers)} but blocks {dual} "
                       f"store a second attention (attn2)")
    proj = _shape(tree, "pos_embed", "proj", "kernel")  # (p, p, in_channels, hidden)
    if proj and proj[0] != c.patch_size:
        out.append(f"config.json says patch_size={c.patch_size} but the pos_embed.proj kernel is {proj}")
    if proj and proj[2] != c.in_channels:
        out.append(f"config.json says in_channels={c.in_channels} but the pos_embed.proj kernel is {proj}")
    table = _shape(tree, "pos_embed", "pos_embed")  # (1, max_size ** 2, hidden)
    if table and c.pos_embed_max_size and table[1] != c.pos_embed_max_size ** 2:
        out.append(f"config.json says pos_embed_max_size={c.pos_embed_max_size} (a {c.pos_embed_max_size ** 2}-entry "
                   f"table) but the stored positional table has {table[1]} entries")
    out_kernel = _shape(tree, "proj_out", "kernel")  # (hidden, p * p * out_channels)
    if out_kernel and proj and out_kernel[1] != proj[0] * proj[1] * c.out_channels:
        out.append(f"config.json says out_channels={c.out_channels} but the proj_out kernel is {out_kernel}")
    return out


def _flat_shapes(tree: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in named_leaves(tree)}


def _tree_misfits(expected: Mapping[tuple[str, ...], tuple], got: Mapping[tuple[str, ...], tuple], limit: int = 3
                  ) -> list[str]:
    """What no named field explains: arrays missing, unexpected or mis-shaped against the config's own shapes."""
    missing = ["/".join(p) for p in expected if p not in got]
    extra = ["/".join(p) for p in got if p not in expected]
    shaped = [f"{'/'.join(p)} is {got[p]} (config.json implies {s})" for p, s in expected.items()
              if p in got and tuple(got[p]) != tuple(s)]
    out = []
    for label, items in (("missing", missing), ("unexpected", extra), ("of another shape", shaped)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            out.append(f"{len(items)} arrays {label}: {', '.join(items[:limit])}{more}")
    return out


def check_fits(config: Any, params: Mapping, where: str) -> None:
    """Raise ConfigMismatch naming the config.json fields (or else the arrays) that the stored shapes contradict."""
    got = _flat_shapes(params)
    if isinstance(config, MMDiTConfig):
        misfits = _transformer_misfits(config, params)
        expected = _flat_shapes(param_shapes(config)) if not misfits else {}
    elif isinstance(config, VAEConfig):
        misfits, expected = [], vae_param_shapes(config)
    else:
        return
    misfits = misfits or _tree_misfits(expected, got)
    if misfits:
        raise ConfigMismatch(f"{where}: {'; '.join(misfits)}. {FIX}.")


def diffusers_shapes(class_name: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes diffusers' `class_name` builds from `config`, on the meta device (no memory)."""
    import diffusers
    import torch

    cls = getattr(diffusers, class_name)
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_exported_file(folder: Path, weights_name: str, class_name: str, config: Mapping[str, Any]) -> None:
    """Refuse an exported component whose safetensors header diffusers' `class_name` would not load."""
    header = SafetensorsFile(folder / weights_name)
    got = {k: header.shape(k) for k in header.keys()}  # noqa: SIM118 -- SafetensorsFile is no Mapping
    expected = diffusers_shapes(class_name, config)
    misfits = _tree_misfits({(k,): v for k, v in expected.items()}, {(k,): v for k, v in got.items()})
    if misfits:
        raise ConfigMismatch(f"{folder}: diffusers' {class_name} built from this config.json would not load "
                             f"{weights_name}: {'; '.join(misfits)}. Nothing was exported; check the checkpoint's "
                             f"config.json.")
