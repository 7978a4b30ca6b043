"""Test-wide settings (8 CPU devices, fp32 with the highest matmul precision, deterministic seeds) and every shared
pytest fixture: a small DreamBench folder, the tiny SD3 pipeline and its checkpoint, the sampler tests' pipelines,
the eval metrics' tiny models. Plain helpers (`write_embeds_with_subject`, `synthetic_photo`) are imported from
here as usual; nothing in this repository's tests reads a path outside it."""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from customshift_jax.numerics import relative_error as rel_err  # noqa: E402,F401

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "examples" / "dog" / "00.jpg"  # DreamBench's dog, shipped with its licence (examples/dog/LICENSE.md)

# A DreamBench folder as google/dreambooth lays it out (`dataset/`): prompts_and_classes.txt, one folder a subject.
# The subjects and their counts of photos, the class words and the prompt templates below are the tests' own, in
# the published file's format; dog's photos are examples/dog's, the others' synthetic.
DREAMBENCH_SUBJECTS = {"backpack": ("backpack", 6), "backpack_dog": ("backpack", 5), "bear_plushie":
                       ("stuffed animal", 5), "can": ("can", 6), "cat": ("cat", 5), "dog": ("dog", 5),
                       "dog2": ("dog", 6)}
DREAMBENCH_OBJECT_PROMPTS = ["in the jungle", "in the snow", "on the beach", "with a wheat field in the background"]
DREAMBENCH_LIVE_PROMPTS = ["in the jungle", "in the snow", "wearing a red hat"]


@pytest.fixture(autouse=True)
def _torch_seed():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)


def _prompt_list(header: str, suffixes: list[str]) -> str:
    lines = "".join(f"'a {{0}} {{1}} {x}'.format(unique_token, class_token),\n" for x in suffixes)
    return f"{header}\n\nprompt_list = [\n{lines}]\n"


def synthetic_photo(seed: int, size: tuple[int, int] = (64, 48)):
    """A deterministic RGB photo stand-in: a coloured ellipse on a gradient, distinct for each seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(60, 200, 3)
    image = Image.fromarray((ramp + rng.uniform(0, 55, 3)).repeat(h, 0).astype(np.uint8))
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    ImageDraw.Draw(image).ellipse((x, y, x + w // 2, y + h // 2), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="session")
def dreambench(tmp_path_factory) -> Path:
    """A small DreamBench folder in the published layout (`DREAMBENCH_SUBJECTS`), built once per session."""
    root = tmp_path_factory.mktemp("dreambench")
    classes = "".join(f"{name},{cls}\n" for name, (cls, _) in DREAMBENCH_SUBJECTS.items())
    (root / "prompts_and_classes.txt").write_text(
        f"Classes\n\nsubject_name,class\n{classes}\nPrompts\n\n"
        + _prompt_list("Object Prompts", DREAMBENCH_OBJECT_PROMPTS) + "\n"
        + _prompt_list("Live Subject Prompts", DREAMBENCH_LIVE_PROMPTS))
    for k, (name, (_, count)) in enumerate(DREAMBENCH_SUBJECTS.items()):
        (root / name).mkdir()
        for i in range(count):
            if name == "dog":
                shutil.copyfile(ROOT / "examples" / "dog" / f"{i:02d}.jpg", root / name / f"{i:02d}.jpg")
            else:
                synthetic_photo(100 * k + i).save(root / name / f"{i:02d}.jpg", quality=92)
    return root


# ------------------------------------------------------------------ the tiny SD3 pipeline, its checkpoint, embeddings
@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline folder with all three text encoders, built once per session."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline_dir_no_text(tmp_path_factory) -> Path:
    """The same without text encoders/tokenizers (null in model_index.json)."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3_notext") / "pipe", with_text_encoders=False, seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_pipe(tiny_pipeline_dir):
    """The diffusers StableDiffusion3Pipeline loaded from `tiny_pipeline_dir` (fp32, CPU)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """`tiny_pipeline_dir` converted to our checkpoint by `customshift convert`, once per session."""
    from customshift_jax.cli.main import main

    dst = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["convert", str(tiny_pipeline_dir), str(dst)]) == 0
    return dst


def write_embeds_with_subject(pipeline_dir: Path, folder: Path) -> Path:
    """An --embeds .npz of two dog prompts (with negatives) and the subject's embeddings, encoded once by the tiny
    pipeline's text encoders, so that generate needs none."""
    import numpy as np

    from customshift_jax.text import TextEncoders

    encoders = TextEncoders.from_pretrained(pipeline_dir)
    prompts = encoders.encode(["a dog on the beach", "a dog in the snow"], max_sequence_length=16)
    subject = encoders.encode(["dog"], max_sequence_length=16, do_classifier_free_guidance=False)
    path = folder / "with_subject.npz"
    np.savez(path, **prompts.arrays(), subject_embeds=subject.prompt_embeds,
             subject_pooled_embeds=subject.pooled_prompt_embeds)
    return path


@pytest.fixture(scope="session")
def embeds_with_subject(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """`write_embeds_with_subject`'s --embeds file, written once per session (no text encoders at generate time)."""
    return write_embeds_with_subject(tiny_pipeline_dir, tmp_path_factory.mktemp("embeds"))


# ------------------------------------------------------- the sampler tests' tiny pipelines (no text encoders, fast)
# An SD3.5-medium-shaped tiny transformer: dual-attention blocks 0-1, qk RMS norm, 4 layers.
SD35M_TINY = {"num_layers": 4, "dual_attention_layers": [0, 1], "qk_norm": "rms_norm"}
DYNAMIC_SHIFT = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _load_sd3_pipeline(path: Path):
    """diffusers' StableDiffusion3Pipeline from `path` (fp32, CPU), progress bar off."""
    from customshift_jax.testing import load_pipeline

    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sampler_sd3m_dir(tmp_path_factory) -> Path:
    """Tiny sd3-medium-shaped pipeline (3 plain layers), null text encoders."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sampler_sd3m") / "pipe", with_text_encoders=False, seed=0)


@pytest.fixture(scope="session")
def sampler_sd35m_dir(tmp_path_factory) -> Path:
    """Tiny sd3.5-medium-shaped pipeline (dual attention 0-1, qk rms_norm, 4 layers), null text encoders."""
    from customshift_jax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sampler_sd35m") / "pipe", transformer_config=SD35M_TINY,
                               with_text_encoders=False, seed=1)


@pytest.fixture(scope="session")
def sampler_dynamic_dir(sampler_sd3m_dir, tmp_path_factory) -> Path:
    """A copy of the sd3-medium folder whose scheduler config turns on resolution-dependent (dynamic) shifting."""
    path = tmp_path_factory.mktemp("sampler_dynamic") / "pipe"
    shutil.copytree(sampler_sd3m_dir, path)
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **DYNAMIC_SHIFT}, indent=2))
    return path


@pytest.fixture(scope="session")
def sd3m_pipe(sampler_sd3m_dir):
    return _load_sd3_pipeline(sampler_sd3m_dir)


@pytest.fixture(scope="session")
def sd35m_pipe(sampler_sd35m_dir):
    return _load_sd3_pipeline(sampler_sd35m_dir)


@pytest.fixture(scope="session")
def dynamic_pipe(sampler_dynamic_dir):
    return _load_sd3_pipeline(sampler_dynamic_dir)


# -------------------------------------------------------------------------------- the eval metrics' tiny models
@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """(tiny CLIP folder, tiny DINO ViT folder), built once per session."""
    from customshift_jax.testing.tiny_eval_models import build_tiny_clip, build_tiny_dino

    root = tmp_path_factory.mktemp("eval_models")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")
