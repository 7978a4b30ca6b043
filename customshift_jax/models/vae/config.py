"""`VAEConfig`: the shape of diffusers' `AutoencoderKL` as SD3 configures it, read from and written to
diffusers' `config.json`. Frozen and hashable, so it can be a static argument of `jax.jit`."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Fields a diffusers config must state: their diffusers defaults describe a different model (SD1's VAE)
# or one we do not implement (quant convs on), so guessing them would load the wrong network.
_REQUIRED = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
)
# Fields with the diffusers default that the loader uses when a (older) config.json omits them.
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "mid_block_add_attention": True,
    "act_fn": "silu",
    "sample_size": 32,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
}
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent scaling of an SD3-style `AutoencoderKL` (no quant convs, GroupNorm eps 1e-6, SiLU)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float | None = 0.0609
    sample_size: int = 1024
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # diffusers metadata only (fp16 pipelines upcast the VAE); kept for round trips

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels is empty; expected at least one block width")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VAEConfig.{name} = {getattr(self, name)!r}; expected a positive integer")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig.block_out_channels {self.block_out_channels} has widths {bad} not divisible by "
                f"norm_num_groups={self.norm_num_groups}; GroupNorm needs every width to be a multiple"
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along one axis: 2 ** (number of blocks - 1); 8 for SD3."""
        return 2 ** (len(self.block_out_channels) - 1)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def sd3(cls) -> VAEConfig:
        """The SD3 / SD3.5 VAE (stabilityai/stable-diffusion-3-medium-diffusers, subfolder vae)."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small VAE with SD3's structure: 3 blocks (2 down/upsamples, a width change with a shortcut
        conv), mid-block attention, 16 latent channels, 8 norm groups of several channels; for tests."""
        return cls(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)

    # ---- diffusers config.json -----------------------------------------------------------------
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Read diffusers' `AutoencoderKL` config dict; a ValueError names any missing or unsupported field."""
        if not isinstance(config, Mapping):
            raise ValueError(f"expected the VAE config as a dict (diffusers config.json), got {type(config).__name__}")
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != "AutoencoderKL":
            raise ValueError(f"VAE config has _class_name={cls_name!r}; expected 'AutoencoderKL'")
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise ValueError(f"VAE config is missing required field(s) {missing}; expected a diffusers AutoencoderKL config.json")
        c = {**_OPTIONAL_DEFAULTS, **dict(config)}
        if c["use_quant_conv"] or c["use_post_quant_conv"]:
            raise ValueError(
                f"VAE config has use_quant_conv={c['use_quant_conv']}, use_post_quant_conv={c['use_post_quant_conv']}: "
                "quant convs are not supported; expected both false (SD3's VAE)"
            )
        if c["act_fn"] != "silu":
            raise ValueError(f"VAE config has act_fn={c['act_fn']!r}; only 'silu' is supported")
        for field in ("latents_mean", "latents_std"):
            if c[field] is not None:
                raise ValueError(
                    f"VAE config has {field}={c[field]!r}: per-channel latent statistics are not supported; "
                    "expected null (SD3 scales latents with scaling_factor and shift_factor only)"
                )
        n = len(c["block_out_channels"])
        for field, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = c.get(field, [kind] * n)
            if list(types) != [kind] * n:
                raise ValueError(f"VAE config has {field}={list(types)}; expected {n} x {kind!r}")
        shift = c["shift_factor"]
        return cls(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            latent_channels=int(c["latent_channels"]),
            block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
            layers_per_block=int(c["layers_per_block"]),
            norm_num_groups=int(c["norm_num_groups"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=None if shift is None else float(shift),
            sample_size=int(c["sample_size"]),
            mid_block_add_attention=bool(c["mid_block_add_attention"]),
            force_upcast=bool(c["force_upcast"]),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` init kwargs (`AutoencoderKL(**cfg)` / `from_config(cfg)` build this VAE)."""
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN_BLOCK] * n,
            "up_block_types": [_UP_BLOCK] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": self.mid_block_add_attention,
        }
