"""SD3's VAE (diffusers `AutoencoderKL`, 16 latent channels, no quant convs) in Flax Linen, with exact
conversion from and to diffusers state dicts (loading from disk: `customshift_jax.io.loading.load_vae`). Public functions take NCHW arrays like diffusers."""
from customshift_jax.models.vae.api import (
    init_vae,
    scale_latents,
    unscale_latents,
    vae_decode,
    vae_encode,
    vae_encode_moments,
)
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.models.vae.mapping import vae_params_from_state_dict, vae_state_dict_from_params
from customshift_jax.models.vae.model import AutoencoderKL

__all__ = [
    "AutoencoderKL",
    "VAEConfig",
    "init_vae",
    "scale_latents",
    "unscale_latents",
    "vae_decode",
    "vae_encode",
    "vae_encode_moments",
    "vae_params_from_state_dict",
    "vae_state_dict_from_params",
]
