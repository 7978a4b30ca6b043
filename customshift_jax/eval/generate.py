"""Run a generation plan with the pipeline: one prefill per (subject, reference), one sampler call per prompt.

The image at seed S is sampled from the noise `customshift generate --seed S --num-images 1` draws, and a
prompt's images are always sampled together (missing ones saved, present ones left alone), so a resumed or
sharded run writes the same images as one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from customshift_jax.eval.plan import PlanItem
from customshift_jax.io.images import load_reference_image
from customshift_jax.pipeline import Pipeline, check_finite_latents, save_png
from customshift_jax.sampling import Conditioning
from customshift_jax.sampling.sampler import initial_latents


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """What shapes every image: sampling steps, guidance, CustomShift's gamma, size, text length."""

    steps: int
    guidance: float
    gamma: float
    height: int
    width: int
    max_sequence_length: int
    negative_prompt: str = ""


@dataclasses.dataclass
class GenerateStats:
    """How a run went: images already there, written now, and left (a --limit stop)."""

    present: int = 0
    written: int = 0
    left: int = 0


def save_png_atomic(image: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """`pipeline.save_png` (a temp file beside `path`, then a rename: no partial PNG on a stop) in a folder made
    for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, metadata)


def noise_for(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """(B, C, h, w) noise: image b from `jax.random.key(seeds[b])` as `customshift generate --seed` draws it."""
    return np.concatenate([np.asarray(initial_latents(jax.random.fold_in(jax.random.key(s), 0), (1, *shape)))
                           for s in seeds])


def _group(item: PlanItem) -> tuple[str, str]:
    return item.subject, item.reference


def _rows(a: np.ndarray | None, i: int, n: int) -> np.ndarray | None:
    """Row i of `a` repeated n times (None stays None): one prompt's conditioning for its n images."""
    return None if a is None else np.repeat(np.asarray(a)[i:i + 1], n, axis=0)


def generate_plan(items: Sequence[PlanItem], out: Path, *, pipe: Pipeline, comps: Any, lora: tuple[Any, Any],
                  encoder: Any, settings: SampleSettings, schedule: Any, params: Any, limit: int | None = None,
                  extra_meta: dict[str, Any] | None = None) -> GenerateStats:
    """Write the plan's missing PNGs under `out` (at most `limit` of them); `lora` is (RAB LoRA, CGB LoRA)."""
    from tqdm import tqdm

    stats = GenerateStats(present=sum((out / it.image).exists() for it in items))
    todo = len(items) - stats.present
    budget = todo if limit is None else min(limit, todo)
    stats.left = todo - budget
    if budget == 0:
        return stats
    rab, cgb = lora
    s = settings
    cfg = s.guidance > 1
    scale = comps.vae_config.downsample_factor
    shape = (comps.config.in_channels, s.height // scale, s.width // scale)
    bar = tqdm(total=budget, desc="images", unit="img", disable=None)
    for (_, reference), group in itertools.groupby(sorted(items, key=_group), key=_group):
        group = list(group)
        if all((out / it.image).exists() for it in group):
            continue
        sub = encoder.encode([group[0].class_word], max_sequence_length=s.max_sequence_length,
                             do_classifier_free_guidance=False)
        latents = pipe.encode_reference(comps.vae_params, load_reference_image(reference, s.height, s.width))
        ref_kv = pipe.reference_cache(params, rab, latents, sub.prompt_embeds, sub.pooled_prompt_embeds)
        by_prompt = {}
        for it in group:
            by_prompt.setdefault(it.prompt_index, []).append(it)
        prompts = [v[0].prompt for v in by_prompt.values()]
        embeds = encoder.encode(prompts, [s.negative_prompt] * len(prompts), max_sequence_length=s.max_sequence_length,
                                do_classifier_free_guidance=cfg)
        for i, batch in enumerate(by_prompt.values()):
            if all((out / it.image).exists() for it in batch):
                continue
            cond = Conditioning(*(_rows(a, i, len(batch)) for a in (
                embeds.prompt_embeds, embeds.pooled_prompt_embeds, embeds.negative_prompt_embeds if cfg else None,
                embeds.negative_pooled_prompt_embeds if cfg else None)))
            z = pipe.sample(params, noise_for([it.seed for it in batch], shape), cond, schedule, guidance=s.guidance,
                            cgb=cgb, ref_kv=ref_kv, gamma=s.gamma)
            z = np.asarray(jax.block_until_ready(z))
            check_finite_latents(z, batch[0].prompt_index, len(by_prompt))
            images = np.asarray(pipe.decode_latents(comps.vae_params, z))
            for it, image in zip(batch, images, strict=True):
                path = out / it.image
                if path.exists():
                    continue
                meta = {**dataclasses.asdict(it), **dataclasses.asdict(s), **(extra_meta or {})}
                save_png_atomic(image, path, meta)
                stats.written += 1
                bar.update(1)
                if stats.written == budget:
                    bar.close()
                    return stats
    bar.close()
    return stats
