"""Sampling: flow-match Euler schedules (host, numpy) and the jit-able sampler with CFG and skip-layer guidance."""
from customshift_jax.sampling.sampler import (
    Conditioning,
    Forward,
    SkipLayerGuidance,
    check_sample_inputs,
    initial_latents,
    latent_shape,
    make_sampler,
    noise_for,
    sample,
    skip_layer_guidance,
    slg_active_steps,
)
from customshift_jax.sampling.schedule import (
    SCHEDULER_DEFAULTS,
    Schedule,
    calculate_shift,
    image_seq_len,
    load_scheduler_config,
    make_schedule,
    mu_for,
)

__all__ = [
    "Conditioning", "Forward", "SCHEDULER_DEFAULTS", "Schedule", "SkipLayerGuidance", "calculate_shift",
    "check_sample_inputs", "image_seq_len", "initial_latents", "latent_shape", "load_scheduler_config",
    "make_sampler", "make_schedule", "mu_for", "noise_for", "sample", "skip_layer_guidance",
    "slg_active_steps",
]
