"""MMDiT configuration: read from diffusers' `config.json` fields, plus named presets (DESIGN section 3)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

# Fields of diffusers' SD3Transformer2DModel config that define the architecture.
_DIFFUSERS_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)
_SUPPORTED_QK_NORM = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The SD3 / SD3.5 MMDiT shape. Frozen and hashable, so it can be a static `jax.jit` argument."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 192
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.qk_norm not in _SUPPORTED_QK_NORM:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; expected one of {_SUPPORTED_QK_NORM}.")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads x "
                f"attention_head_dim ({self.inner_dim}): the joint attention concatenates both streams."
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside 0..{self.num_layers - 1}.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def latent_fits(self, height: int, width: int) -> bool:
        """The one size rule: a (height, width) latent is positive, a multiple of the patch size on both sides,
        and its patch grid fits the position table (pos_embed_max_size patches a side)."""
        p, m = self.patch_size, self.pos_embed_max_size
        return height > 0 and width > 0 and not height % p and not width % p and max(height, width) // p <= m

    def block_kind(self, index: int) -> tuple[bool, bool]:
        """(use_dual_attention, context_pre_only) of block `index`, as diffusers builds it."""
        return index in self.dual_attention_layers, index == self.num_layers - 1

    def block_groups(self) -> tuple[tuple[int, int], ...]:
        """Runs [start, stop) of consecutive blocks of one structure: each run is one `nn.scan`."""
        groups, start = [], 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.block_kind(i) != self.block_kind(start):
                groups.append((start, i))
                start = i
        return tuple(groups)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "MMDiTConfig":
        """Build from a diffusers `SD3Transformer2DModel` config dict; missing fields take diffusers' defaults."""
        defaults = _DIFFUSERS_DEFAULTS
        values = {k: config.get(k, defaults[k]) for k in _DIFFUSERS_FIELDS}
        if values["out_channels"] is None:
            values["out_channels"] = values["in_channels"]
        values["dual_attention_layers"] = tuple(values["dual_attention_layers"] or ())
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "MMDiTConfig":
        """Read a diffusers transformer `config.json`; a file that is not JSON is a clear error."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; expected a diffusers transformer folder.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}.")
        return cls.from_diffusers_config(data)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The config dict that `SD3Transformer2DModel(**config)` accepts."""
        out = {k: getattr(self, k) for k in _DIFFUSERS_FIELDS}
        out["dual_attention_layers"] = list(self.dual_attention_layers)
        return out


# diffusers' SD3Transformer2DModel __init__ defaults (0.42), used for fields a config.json omits.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}

PRESETS: dict[str, MMDiTConfig] = {
    # Released shapes (fields as in the released diffusers config.json files).
    "sd3-medium": MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                              pos_embed_max_size=192),
    "sd3.5-medium": MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                qk_norm="rms_norm"),
    "sd3.5-large": MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                               pos_embed_max_size=192, qk_norm="rms_norm"),
}
_TINY = dict(sample_size=8, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
             joint_attention_dim=32, pooled_projection_dim=24, pos_embed_max_size=16)
PRESETS.update({
    # Same structure at a small width: plain blocks + context_pre_only last block.
    "tiny-sd3-medium": MMDiTConfig(num_layers=3, **_TINY),
    # Dual-attention run, plain run, context_pre_only last block, qk RMS norm.
    "tiny-sd3.5-medium": MMDiTConfig(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm", **_TINY),
    # qk RMS norm, no dual attention.
    "tiny-sd3.5-large": MMDiTConfig(num_layers=3, qk_norm="rms_norm", **_TINY),
})


def get_preset(name: str) -> MMDiTConfig:
    """A named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.") from None
