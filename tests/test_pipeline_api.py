"""`CustomShiftPipeline`: the same images as `customshift generate`, byte for byte (the tiny pipeline and the
shipped subject-world model), one prefill for a prompt list, the reference cache reused across calls, the
attention backend reaching the model, and every bad argument a one-line error before anything compiles."""
import math

import numpy as np
import pytest
from conftest import DOG
from PIL import Image

from customshift_jax import CustomShiftPipeline
from customshift_jax.cli.main import main
from customshift_jax.numerics import relative_error

PROMPTS = ["a dog on the beach", "a dog in the snow"]


def _generate(tmp_path, name, *argv):
    """`customshift generate ... --out tmp/name --save-latents tmp/name.npy` -> (pixels by file name, latents)."""
    out = tmp_path / name
    assert main(["generate", *argv, "--out", str(out), "--save-latents", str(out) + ".npy"]) == 0
    pngs = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    return pngs, np.load(str(out) + ".npy")


def _pngs(images, n_prompts, n):
    """The pipeline's PIL images under the names `customshift generate` gives them."""
    assert len(images) == n_prompts * n and all(isinstance(im, Image.Image) for im in images)
    return {f"{i:03d}_{j:02d}.png": np.asarray(images[i * n + j]) for i in range(n_prompts) for j in range(n)}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir, tiny_pipeline_dir, tmp_path_factory):
    """The tiny checkpoint as a pipeline (text encoders from the tiny diffusers folder), and its arguments."""
    cache = tmp_path_factory.mktemp("text")
    pipe = CustomShiftPipeline.from_pretrained(tiny_checkpoint_dir, text_encoders=tiny_pipeline_dir,
                                               text_cache=cache)
    return pipe, cache


def test_tiny_pipeline_equals_generate_and_prefills_once(tiny, tiny_checkpoint_dir, tiny_pipeline_dir,
                                                         tmp_path):
    pipe, cache = tiny
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    pngs, latents = _generate(
        tmp_path, "cli", "--checkpoint", str(tiny_checkpoint_dir), "--text-encoders", str(tiny_pipeline_dir),
        "--text-cache", str(cache), "--prompts-file", str(tmp_path / "prompts.txt"), "--reference", str(DOG),
        "--subject", "dog", "--num-images", "2", "--steps", "2", "--guidance", "4", "--gamma", "1.5", "--seed", "3",
        "--height", "16", "--width", "24", "--max-sequence-length", "16")
    kw = dict(subject="dog", num_images_per_prompt=2, num_inference_steps=2, guidance_scale=4.0, gamma=1.5, seed=3,
              height=16, width=24, max_sequence_length=16)
    calls = []
    prefill = pipe.steps.reference_cache
    pipe.steps.reference_cache = lambda *a: calls.append(1) or prefill(*a)  # counts the prefills that run
    try:
        images = pipe(PROMPTS, reference=str(DOG), **kw).images
        assert len(calls) == 1 and pipe.prefills == 1  # one reference, two prompts: one prefill
        ours = _pngs(images, 2, 2)
        assert sorted(ours) == sorted(pngs)
        for name, pixels in pngs.items():
            np.testing.assert_array_equal(ours[name], pixels, err_msg=name)
        z = pipe(PROMPTS, reference=str(DOG), output_type="latent", **kw).images
        np.testing.assert_array_equal(z, latents)  # the same reference again: no second prefill
        again = pipe(PROMPTS[1], reference=Image.open(DOG), output_type="np", **{**kw, "gamma": 0.5}).images
        assert len(calls) == 1 and pipe.prefills == 1  # the same pixels given as a PIL image: the cache's key
        assert again.shape == (2, 16, 24, 3) and again.dtype == np.float32 and 0 <= again.min() <= again.max() <= 1
        pipe(PROMPTS[1], reference=str(DOG), **{**kw, "subject": "cat", "num_inference_steps": 1})
        assert len(calls) == 2 and pipe.prefills == 2  # another subject: a new cache
    finally:
        pipe.steps.reference_cache = prefill


def test_world_model_pipeline_equals_generate(tmp_path):
    from customshift_jax.toyworld import world
    from customshift_jax.toyworld.methods import WEIGHTS

    if not (WEIGHTS / "model").is_dir():
        pytest.skip("no shipped world weights")
    _, held = world.split_subjects(0)
    star = next(s for s in held if s.name == "star")
    reference = world.render(star, world.Context(scene=1, position=0, size=1), rng=0)  # uint8 (32, 32, 3)
    Image.fromarray(reference).save(tmp_path / "reference.png")
    prompts = [world.caption("star", world.Context(0, 2, 1)), world.caption("star", world.Context(3, 1, 0))]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    pngs, _ = _generate(
        tmp_path, "cli", "--checkpoint", str(WEIGHTS / "model"), "--lora", str(WEIGHTS / "customshift"),
        "--prompts-file", str(tmp_path / "prompts.txt"), "--reference", str(tmp_path / "reference.png"),
        "--subject", "star", "--height", "32", "--width", "32", "--steps", "3", "--guidance", "1", "--gamma", "2",
        "--text-cache", str(tmp_path / "text"))
    pipe = CustomShiftPipeline.from_pretrained(WEIGHTS / "model", lora=WEIGHTS / "customshift")
    images = pipe(prompts, reference=reference, subject="star", height=32, width=32, num_inference_steps=3,
                  guidance_scale=1.0, gamma=2.0).images  # the array itself: the same pixels as its PNG file
    assert pipe.prefills == 1
    ours = _pngs(images, 2, 1)
    assert sorted(ours) == sorted(pngs)
    for name, pixels in pngs.items():
        np.testing.assert_array_equal(ours[name], pixels, err_msg=name)


def test_world_methods_draw_what_the_pipeline_draws():
    """The world's demo and evaluation (`toyworld.methods.Generator`) sample through the pipeline's own
    `sample_from_embeds`: with the same embeddings, reference and noise, its text-only and CustomShift images are
    the pipeline's, pixel for pixel."""
    from customshift_jax.text import PromptEmbeds
    from customshift_jax.toyworld import world
    import jax

    from customshift_jax.sampling import noise_for
    from customshift_jax.toyworld.methods import GUIDANCE, WEIGHTS, Generator, WorldModel
    from customshift_jax.toyworld.tiny_sd3 import LATENT_SHAPE

    if not (WEIGHTS / "model").is_dir():
        pytest.skip("no shipped world weights")
    _, held = world.split_subjects(0)
    star = next(s for s in held if s.name == "star")
    reference = world.render(star, world.Context(scene=1, position=0, size=1), rng=0)  # uint8 (32, 32, 3)
    model = WorldModel.load()
    prompt = model.encode_text([world.caption("star", world.Context(0, 2, 1)),
                                world.caption("star", world.Context(3, 1, 0))])
    subject = model.encode_text(["star"])
    noise = np.asarray(noise_for([jax.random.key(seed) for seed in (1, 2)], LATENT_SHAPE))
    generator = Generator(model, steps=3)
    ref = model.encode_images(reference[None])
    one = lambda i: dict(noise=noise[i:i + 1], prompt=tuple(a[i:i + 1] for a in prompt))  # noqa: E731
    # One prompt a call, as the pipeline samples them: under CFG a batch of another size may round differently.
    drawn = {"text only": np.concatenate([generator.run("text only", **one(i)) for i in range(2)]),
             "customshift": np.concatenate([generator.run("customshift", **one(i), reference=ref, subject=subject,
                                                          gamma=2.0) for i in range(2)])}
    pipe = CustomShiftPipeline.from_pretrained(WEIGHTS / "model", lora=WEIGHTS / "customshift", progress=False)
    negatives = (np.zeros_like(prompt[0]), np.zeros_like(prompt[1]))  # the world's CFG: zeros, as training drops text
    kw = dict(prompt_embeds=PromptEmbeds(*prompt, *negatives), height=32, width=32, num_inference_steps=3,
              guidance_scale=GUIDANCE, latents=noise)
    ours = {"text only": pipe(**kw).images,
            "customshift": pipe(**kw, reference=reference, subject_embeds=subject, gamma=2.0).images}
    for method, images in ours.items():
        np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]), drawn[method], err_msg=method)


def test_attention_backend_reaches_the_model(tiny_checkpoint_dir, monkeypatch):
    """attention="flash" runs the Pallas kernel (interpret mode on CPU) in the prefill and every step, and gives
    the xla backend's latents (the kernel's bound, 1e-5)."""
    from customshift_jax.models.mmdit import attention
    from customshift_jax.text import PromptEmbeds

    rng = np.random.default_rng(0)
    embeds = PromptEmbeds(rng.standard_normal((1, 7, 96)).astype(np.float32),
                          rng.standard_normal((1, 80)).astype(np.float32))
    subject = (rng.standard_normal((1, 5, 96)).astype(np.float32), rng.standard_normal((1, 80)).astype(np.float32))
    reference = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    kw = dict(reference=reference, subject_embeds=subject, num_inference_steps=2, guidance_scale=1.0, height=16,
              width=24, output_type="latent", prompt_embeds=embeds)
    traced = []
    flash = attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **k: traced.append(1) or flash(*a, **k))
    got = {}
    for backend in ("xla", "flash"):
        pipe = CustomShiftPipeline.from_pretrained(tiny_checkpoint_dir, attention=backend, progress=False)
        got[backend] = pipe(**kw).images
        assert bool(traced) == (backend == "flash"), backend
    assert relative_error(got["flash"], got["xla"]) <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt: '' is not a non-empty string"),
    (dict(prompt=[]), "prompt=[]: expected a string or a non-empty list"),
    (dict(prompt=None), "give exactly one of prompt= (text) or prompt_embeds="),
    (dict(num_images_per_prompt=0), "num_images_per_prompt=0: expected a whole number >= 1"),
    (dict(num_inference_steps=1.5), "num_inference_steps=1.5: expected a whole number >= 1"),
    (dict(guidance_scale=math.nan), "guidance_scale=nan: expected a finite number"),
    (dict(gamma=-1.0), "gamma=-1.0: expected a finite number >= 0"),
    (dict(seed=2**32), "seed=4294967296: expected a whole number from 0 to 4294967295"),
    (dict(seed=-1), "seed=-1: expected a whole number"),
    (dict(height=18), "height 18 and width 24 must be positive multiples of 4"),
    (dict(height=16.0), "height=16.0, width=24: expected whole numbers"),
    (dict(output_type="tensor"), "output_type='tensor': expected one of pil, np, latent"),
    (dict(reference=str(DOG)), "reference= needs exactly one of subject="),
    (dict(subject="dog"), "subject= is given without reference="),
    (dict(reference=str(DOG), subject=" "), "subject=' ': give the subject's name"),
    (dict(reference="no/such.jpg", subject="dog"), "reference image no/such.jpg: no such file"),
    (dict(reference=np.zeros((8, 8, 3), np.float32), subject="dog"), "reference: an array must be uint8 (H, W, 3)"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt: expected a string or a list of 1 strings"),
    (dict(latents=np.zeros((2, 16, 8, 12), np.float32)), "latents has shape (2, 16, 8, 12); expected (1, 16, 8, 12)"),
    (dict(max_sequence_length=0), "max_sequence_length=0: expected a whole number from 1 to 512"),
])
def test_bad_call_arguments_are_one_line_errors_before_any_compile(tiny, kwargs, message, monkeypatch):
    from customshift_jax import pipeline

    pipe, _ = tiny

    def compiled(*args, **kw):
        raise AssertionError("something compiled before the arguments were checked")

    monkeypatch.setattr(pipeline.Pipeline, "_get", compiled)  # how every stage builds its compiled function
    monkeypatch.setattr(pipe, "text_encoder", compiled)  # the text encoders: loaded and run only after the checks
    call = dict(prompt="a dog", height=16, width=24, num_inference_steps=1) | kwargs
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        pipe(**call)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention="fast"), "attention='fast': expected one of xla, blocked, flash"),
    (dict(text_backend="tf"), "text_backend='tf': expected one of auto, torch, jax"),
    (dict(dtype="fp8"), "dtype: unknown dtype 'fp8'"),
    (dict(shift="add"), "shift='add': expected one of cads, concat"),
    (dict(mesh="data=2", rules="zero3"), "unknown rule set"),
    (dict(lora="no/such/lora"), "lora: "),
])
def test_bad_from_pretrained_arguments_fail_before_loading(tiny_checkpoint_dir, kwargs, message,
                                                           monkeypatch):
    from customshift_jax import pipeline

    def loaded(*args, **kw):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "load_components", loaded)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        CustomShiftPipeline.from_pretrained(tiny_checkpoint_dir, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_generate_passes_its_flags_to_the_pipeline(tmp_path, monkeypatch, capsys):
    """`customshift generate --attention flash` (and the other model flags) reach `from_pretrained`."""
    seen = {}

    def stop(cls, path, **kwargs):
        seen.update(kwargs, path=path)
        raise ValueError("stopped after the flags were read")

    monkeypatch.setattr(CustomShiftPipeline, "from_pretrained", classmethod(stop))
    code = main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a dog", "--attention", "flash", "--mesh",
                 "data=2", "--rules", "dp", "--shift", "concat", "--out", str(tmp_path / "o")])
    assert code == 2 and "stopped after the flags were read" in capsys.readouterr().err
    assert seen["path"] == str(tmp_path) and seen["attention"] == "flash" and seen["mesh"] == "data=2"
    assert seen["rules"] == "dp" and seen["shift"] == "concat"
