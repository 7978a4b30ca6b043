"""Run a generation plan with `CustomShiftPipeline`: one prefill per (subject, reference), one call per prompt.

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

from customshift_jax.customshift_pipeline import CustomShiftPipeline
from customshift_jax.eval.plan import PlanItem
from customshift_jax.pipeline import save_png
from customshift_jax.sampling.sampler import noise_for
from customshift_jax.text import PromptEmbeds


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


def _seed_keys(batch: Sequence[PlanItem]) -> list[jax.Array]:
    """Image b's noise key: `customshift generate --seed` (prompt 0) draws from fold_in(key(seed), 0)."""
    return [jax.random.fold_in(jax.random.key(it.seed), 0) for it in batch]


def _row(embeds: PromptEmbeds, i: int) -> PromptEmbeds:
    """Prompt i of `embeds` (with its negatives, if any)."""
    return PromptEmbeds(*(None if a is None else a[i:i + 1] for a in (
        embeds.prompt_embeds, embeds.pooled_prompt_embeds, embeds.negative_prompt_embeds,
        embeds.negative_pooled_prompt_embeds)))


def _group(item: PlanItem) -> tuple[str, str]:
    return item.subject, item.reference


def generate_plan(items: Sequence[PlanItem], out: Path, *, pipe: CustomShiftPipeline, settings: SampleSettings,
                  limit: int | None = None, extra_meta: dict[str, Any] | None = None) -> GenerateStats:
    """Write the plan's missing PNGs under `out` (at most `limit` of them) with `pipe`; the pipeline keeps each
    (subject, reference)'s cache across its prompts, so a group runs one prefill."""
    from tqdm import tqdm

    stats = GenerateStats(present=sum((out / it.image).exists() for it in items))
    todo = len(items) - stats.present
    budget = todo if limit is None else min(limit, todo)
    stats.left = todo - budget
    if budget == 0:
        return stats
    s = settings
    scale = pipe.vae_scale
    shape = (pipe.config.in_channels, s.height // scale, s.width // scale)
    bar = tqdm(total=budget, desc="images", unit="img", disable=None)
    for (_, reference), group in itertools.groupby(sorted(items, key=_group), key=_group):
        group = list(group)
        by_prompt: dict[int, list[PlanItem]] = {}
        for it in group:
            by_prompt.setdefault(it.prompt_index, []).append(it)
        if all((out / it.image).exists() for it in group):
            continue
        prompts = [v[0].prompt for v in by_prompt.values()]  # encoded as one batch, as a group always was
        embeds = pipe.text_encoder().encode(prompts, [s.negative_prompt] * len(prompts),
                                            max_sequence_length=s.max_sequence_length,
                                            do_classifier_free_guidance=s.guidance > 1)
        for i, batch in enumerate(by_prompt.values()):
            if all((out / it.image).exists() for it in batch):
                continue
            result = next(pipe.each_prompt(
                reference=reference, subject=batch[0].class_word, num_images_per_prompt=len(batch),
                num_inference_steps=s.steps, guidance_scale=s.guidance, gamma=s.gamma, height=s.height,
                width=s.width, prompt_embeds=_row(embeds, i), latents=noise_for(_seed_keys(batch), shape),
                max_sequence_length=s.max_sequence_length))
            for it, image in zip(batch, result.images, strict=True):
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
