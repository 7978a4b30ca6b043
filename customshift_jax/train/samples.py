"""Sample images during training: fixed references, prompts and noise, the current LoRAs, one compiled sampler.

Everything a sample needs is fixed when training starts: the prompt embeddings (prepared records' captions or
an `--embeds`-style .npz, so no text encoder runs in the training process), the reference latents and subject
embeddings, and the initial noise (from `sample.seed`). Each call runs the RAB prefill with the current RAB
LoRA and the CustomShift sampler with the current CGB LoRA (`customshift_pipeline.sample_from_embeds`, as
`CustomShiftPipeline` samples); it reads neither the training RNG nor the data iterator, so sampling never
changes what training computes. In train.mode=base (`BaseTrainingSampler`) the
prompts alone drive the plain SD3 sampler with the base weights being trained (their EMA when one is kept);
`sample.reference`, `sample.subject` and `sample.gamma` are not used there.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from customshift_jax.customshift_pipeline import sample_from_embeds, text_conditioning
from customshift_jax.io.images import load_reference_image
from customshift_jax.io.loading import load_vae
from customshift_jax.io.safe_files import atomic_write, make_dir
from customshift_jax.models.mmdit.options import RunOptions
from customshift_jax.models.vae import scale_latents, vae_encode
from customshift_jax.parallel.distributed import gather
from customshift_jax.pipeline import Pipeline, load_embeds_file, save_png
from customshift_jax.sampling import initial_latents, make_schedule
from customshift_jax.train.data import ShardDataset


@dataclasses.dataclass
class SampleInputs:
    """The fixed host arrays of every sample call (P prompts, one reference; no reference in train.mode=base)."""

    prompt_embeds: np.ndarray          # (P, M, J)
    pooled: np.ndarray                 # (P, Pd)
    negative_embeds: np.ndarray        # (P, M, J): the npz's negatives, else zeros (training's unconditional)
    negative_pooled: np.ndarray        # (P, Pd)
    ref_latents: np.ndarray | None     # (1, C, h, w)
    subject_embeds: np.ndarray | None  # (1, S, J)
    subject_pooled: np.ndarray | None  # (1, Pd)
    names: list[str]                   # one label a prompt (PNG metadata)


def _record(dataset: ShardDataset, index: Any, what: str) -> dict[str, np.ndarray]:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(dataset):
        raise ValueError(f"sample.{what} = {index!r}: expected a record index in 0..{len(dataset) - 1} of the "
                         f"prepared data {dataset.path}.")
    return dataset.get(index)


def _prompts(scfg: dict, dataset: ShardDataset, from_file: Any) -> tuple[np.ndarray, ...]:
    """(embeds, pooled, negative embeds, negative pooled, names) of the configured prompts."""
    chosen = scfg["prompts"]
    if from_file is not None:  # the sample.embeds file's PromptEmbeds
        embeds = from_file
        n = embeds.prompt_embeds.shape[0]
        chosen = list(range(n)) if chosen is None else list(chosen)
        bad = [i for i in chosen if not isinstance(i, int) or not 0 <= i < n]
        if bad or not chosen:
            raise ValueError(f"sample.prompts {scfg['prompts']!r}: expected indices in 0..{n - 1} of the prompts "
                             f"in sample.embeds {scfg['embeds']}.")
        emb, pooled = embeds.prompt_embeds[chosen], embeds.pooled_prompt_embeds[chosen]
        neg = embeds.negative_prompt_embeds[chosen] if embeds.has_negative else np.zeros_like(emb)
        neg_pooled = embeds.negative_pooled_prompt_embeds[chosen] if embeds.has_negative else np.zeros_like(pooled)
        return emb, pooled, neg, neg_pooled, [f"prompt {i} of {scfg['embeds']}" for i in chosen]
    chosen = [scfg["reference"] if isinstance(scfg["reference"], int) else 0] if chosen is None else list(chosen)
    if not chosen:
        raise ValueError("sample.prompts is empty; give record indices of the prepared data (their captions).")
    rows = [_record(dataset, i, "prompts") for i in chosen]
    emb, pooled = np.stack([r["prompt_embeds"] for r in rows]), np.stack([r["pooled"] for r in rows])
    return emb, pooled, np.zeros_like(emb), np.zeros_like(pooled), [f"caption of record {i}" for i in chosen]


def sample_inputs(scfg: dict, dataset: ShardDataset, vae: tuple | None) -> SampleInputs:
    """Resolve `sample.prompts / embeds / reference / subject` into fixed arrays (no text encoder runs)."""
    file_embeds, file_subject = (load_embeds_file(scfg["embeds"], need_subject=None, what="sample.embeds")
                                 if scfg["embeds"] is not None else (None, None))
    ref = scfg["reference"]
    if not isinstance(ref, str):
        _record(dataset, ref, "reference")
    emb, pooled, neg, neg_pooled, names = _prompts(scfg, dataset, file_embeds)
    if isinstance(ref, str):
        if vae is None:
            raise ValueError(f"sample.reference {ref!r} is an image: set sample.vae (a checkpoint or pipeline "
                             "folder with the VAE) to encode it, or give a record index of the prepared data.")
        ref_latents = encode_reference(ref, vae, dataset.index["latent_shape"])
    else:
        ref_latents = _record(dataset, ref, "reference")["ref_latents"][None]
    subject = scfg["subject"]
    if subject is None and isinstance(ref, int):
        subject = ref
    if subject is None:
        if file_subject is None:
            raise ValueError("sample.reference is an image, so the subject name's embeddings must come from "
                             "sample.embeds (subject_embeds, subject_pooled_embeds) or sample.subject (a record "
                             "index of the prepared data).")
        s_emb, s_pooled = file_subject[0][:1], file_subject[1][:1]
    else:
        row = _record(dataset, subject, "subject")
        s_emb, s_pooled = row["subject_embeds"][None], row["subject_pooled"][None]
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    return SampleInputs(f32(emb), f32(pooled), f32(neg), f32(neg_pooled), f32(ref_latents), f32(s_emb),
                        f32(s_pooled), names)


def encode_reference(path: str, vae: tuple, latent_shape: list[int]) -> np.ndarray:
    """(1, C, h, w) scaled VAE latents of the image at `path`, at the prepared data's latent size."""
    import jax

    vae_config, vae_params = vae
    size = latent_shape[-1] * vae_config.downsample_factor
    pixels = load_reference_image(path, size, size)
    z = jax.jit(vae_encode, static_argnums=0)(vae_config, vae_params, pixels)
    return np.asarray(scale_latents(vae_config, z))


def latent_preview(z: np.ndarray) -> np.ndarray:
    """(C, h, w) latents -> (3, h, w) in [-1, 1]: the first three channels, each image min-max scaled."""
    x = np.asarray(z[:3], np.float32)
    lo, hi = x.min(), x.max()
    return 2.0 * (x - lo) / max(hi - lo, 1e-12) - 1.0


class TrainingSampler:
    """`__call__(trainable, base_params, step)` writes OUT/samples/step-XXXXXX/*.png and returns the images.

    The prefill and the sampler are built and jitted once (only their inputs change between calls).
    """

    def __init__(self, cfg: dict, config: Any, lora_config: Any, dataset: ShardDataset, out: Path):
        import jax

        scfg = cfg["sample"]
        self.scfg, self.out = scfg, Path(out)
        self.vae = None
        if scfg["vae"] is not None:
            self.vae = load_vae(scfg["vae"])
        self.inputs = self._inputs(scfg, dataset)
        n = self.inputs.prompt_embeds.shape[0]
        shape = (n,) + tuple(dataset.index["latent_shape"])
        self.guidance = float(scfg["guidance"])
        self.cond = text_conditioning(self.inputs.prompt_embeds, self.inputs.pooled, self.inputs.negative_embeds,
                                      self.inputs.negative_pooled, guidance=self.guidance)
        self.schedule = make_schedule({"shift": float(scfg["schedule_shift"])}, int(scfg["steps"]),
                                      image_seq_len=(shape[2] // config.patch_size) * (shape[3] // config.patch_size))
        self.noise = np.asarray(initial_latents(jax.random.key(int(scfg["seed"])), shape))
        self.meta = dict(seed=scfg["seed"], steps=scfg["steps"], guidance=self.guidance, gamma=scfg["gamma"],
                         decoded=self.vae is not None)  # PNG metadata beside the prompt and step
        self._build(config, lora_config, cfg["train"])

    def _inputs(self, scfg: dict, dataset: ShardDataset) -> SampleInputs:
        """The fixed prompts, reference and subject of every call."""
        return sample_inputs(scfg, dataset, self.vae)

    def _build(self, config: Any, lora_config: Any, t: dict) -> None:
        """The pipeline (RAB prefill and CustomShift sampler, compiled on first use, then reused)."""
        self.pipe = Pipeline(config, None if self.vae is None else self.vae[0], lora_config=lora_config,
                             shift=t["shift"], form=t["form"], options=RunOptions(dtype=t["dtype"]),
                             decode=self.vae is not None)

    def _sample(self, trainable: Any, base_params: Any) -> Any:
        """Latents (or decoded images) of every prompt with the current LoRAs."""
        i = self.inputs
        return sample_from_embeds(self.pipe, base_params, self.cond, self.schedule, guidance=self.guidance,
                                  latents=self.noise, vae_params=None if self.vae is None else self.vae[1],
                                  rab=trainable["rab"], cgb=trainable["cgb"], reference=i.ref_latents,
                                  subject=(i.subject_embeds, i.subject_pooled), gamma=self.scfg["gamma"])

    def __call__(self, trainable: Any, base_params: Any, step: int, metrics: Any = None) -> np.ndarray:
        """Sample with the current weights; process 0 writes the PNGs (and logs them when `metrics` is given)."""
        import jax

        got = gather(self._sample(trainable, base_params))
        images = got if self.vae is not None else np.stack([latent_preview(z) for z in got])
        if jax.process_index() != 0:
            return images
        folder = self.out / "samples" / f"step-{step:06d}"
        make_dir(folder, "samples folder")
        if self.vae is None:
            with atomic_write(folder / "latents.npy", what="sample latents") as f:
                np.save(f, got)
        pngs = {}
        for k, (image, name) in enumerate(zip(images, self.inputs.names)):
            path = folder / f"{k:02d}.png"
            save_png(image, path, dict(prompt=name, step=step, **self.meta))
            pngs[f"samples/{k:02d}"] = path.read_bytes()
        if metrics is not None:
            metrics.images(step, pngs)
        return images


class BaseTrainingSampler(TrainingSampler):
    """train.mode=base: the plain SD3 sampler (`sampling.make_sampler`) on the prompts, with the trained weights."""

    def _inputs(self, scfg: dict, dataset: ShardDataset) -> SampleInputs:
        file_embeds = (load_embeds_file(scfg["embeds"], need_subject=False, what="sample.embeds")[0]
                       if scfg["embeds"] is not None else None)
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        *arrays, names = _prompts(scfg, dataset, file_embeds)
        return SampleInputs(*map(f32, arrays), None, None, None, names)

    def _build(self, config: Any, lora_config: Any, t: dict) -> None:  # noqa: ARG002

        del self.meta["gamma"]
        self.pipe = Pipeline(config, None if self.vae is None else self.vae[0], options=RunOptions(dtype=t["dtype"]),
                             decode=self.vae is not None)

    def _sample(self, trainable: Any, base_params: Any) -> Any:  # noqa: ARG002
        return sample_from_embeds(self.pipe, trainable, self.cond, self.schedule, guidance=self.guidance,
                                  latents=self.noise, vae_params=None if self.vae is None else self.vae[1])


def maybe_sampler(cfg: dict, parts: Any, out: Path) -> Callable | None:
    """The training sampler of `train.mode` when `sample.every` > 0, else None."""
    if not int(cfg["sample"]["every"]):
        return None
    cls = BaseTrainingSampler if cfg["train"]["mode"] == "base" else TrainingSampler
    return cls(cfg, parts.config, parts.lora_config, parts.dataset, out)
