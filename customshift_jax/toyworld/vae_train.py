"""Train the world's SD3 VAE (our Flax `AutoencoderKL`) on renders of the world, and set its latent scaling
(SD3's `(z - shift_factor) * scaling_factor`) from the trained encoder's latents, so the MMDiT sees unit variance."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from customshift_jax.models.vae.api import vae_decode, vae_encode_moments
from customshift_jax.models.vae.config import VAEConfig
from customshift_jax.pipeline import to_pixels
from customshift_jax.toyworld import world

KL_WEIGHT = 1e-4  # small: the latents stay informative, the KL only keeps their scale bounded


def to_model_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1], the VAE's input."""
    return np.transpose(images.astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))


def render_pool(n: int, seed: int, subjects: list[world.Subject] | None = None) -> np.ndarray:
    """(n, 32, 32, 3) uint8 renders of random (training) subjects in random contexts."""
    rng = np.random.default_rng(seed)
    subjects = subjects if subjects is not None else world.split_subjects(0)[0]
    items = [(subjects[int(rng.integers(len(subjects)))], world.random_context(rng)) for _ in range(n)]
    return world.render_batch(items, 32, seed)


def make_vae_step(config: VAEConfig, optimizer: optax.GradientTransformation) -> Callable:
    """Pure `step(params, opt_state, images, key) -> (params, opt_state, metrics)`: L1 + MSE reconstruction of a
    posterior sample, plus KL_WEIGHT times the KL to N(0, 1)."""

    def loss_fn(params, images, key):
        mean, logvar = vae_encode_moments(config, params, images)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae_decode(config, params, z)
        err = recon - images
        rec = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=1))
        return rec + KL_WEIGHT * kl, {"rec": rec, "kl": kl}

    def step(params, opt_state, images, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    return step


def latent_scaling(config: VAEConfig, params: Any, images: np.ndarray) -> tuple[float, float]:
    """(scaling_factor, shift_factor): 1 / std and the mean of the posterior means over `images`."""
    enc = jax.jit(lambda p, x: vae_encode_moments(config, p, x)[0])
    z = np.concatenate([np.asarray(enc(params, to_model_images(images[i:i + 256])))
                        for i in range(0, len(images), 256)])
    return float(1.0 / z.std()), float(z.mean())


def train_vae(config: VAEConfig, params: Any, *, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
              pool: int = 12000, seed: int = 0, log: Callable = print) -> tuple[VAEConfig, Any]:
    """Train from `params` on a pool of renders; returns the config with its latent scaling set and the params."""
    from tqdm import tqdm

    images = render_pool(pool, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, 100, steps, lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    opt_state = optimizer.init(params)
    step = jax.jit(make_vae_step(config, optimizer))
    rng = np.random.default_rng(seed + 1)
    key = jax.random.key(seed)
    bar = tqdm(range(steps), desc="vae", file=sys.stderr, dynamic_ncols=True, mininterval=2)
    for i in bar:
        x = to_model_images(images[rng.integers(0, len(images), batch)])
        params, opt_state, m = step(params, opt_state, x, jax.random.fold_in(key, i))
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(rec=f"{float(m['rec']):.4f}", kl=f"{float(m['kl']):.1f}")
    scale, shift = latent_scaling(config, params, images[:2048])
    log(f"vae: {steps} steps, reconstruction loss {float(m['rec']):.4f}; latent scaling {scale:.4f}, shift {shift:.4f}")
    return dataclasses.replace(config, scaling_factor=scale, shift_factor=shift), jax.device_get(params)


def reconstruct(config: VAEConfig, params: Any, images: np.ndarray) -> np.ndarray:
    """uint8 images -> their VAE reconstructions (posterior mean, decoded) as uint8."""
    fn = jax.jit(lambda p, x: vae_decode(config, p, vae_encode_moments(config, p, x)[0]))
    return np.concatenate([to_pixels(fn(params, to_model_images(images[i:i + 256])))
                           for i in range(0, len(images), 256)])
