"""The eval metrics against direct transformers computations on tiny random CLIP and DINO ViT folders."""
import numpy as np
import pytest
from PIL import Image

PROMPTS = ["a dog in the jungle", "a dog wearing a red hat", "a backpack on the beach"]


@pytest.fixture(scope="module")
def photos(dreambench):
    """Two photos of one dog and one of a backpack (DreamBench's layout)."""
    return [dreambench / "dog" / "00.jpg", dreambench / "dog" / "01.jpg", dreambench / "backpack" / "00.jpg"]


def test_clip_t_and_clipscore_equal_transformers(eval_models, photos):
    """CLIP-T per pair and CLIPScore (torchmetrics' definition, 100 * cos clamped at 0, rescaled to w = 2.5)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from customshift_jax.eval import metrics
    from customshift_jax.eval.encoders import ClipEncoder, read_image

    clip_dir, _ = eval_models
    images = [read_image(p) for p in photos]
    ours_enc = ClipEncoder(clip_dir)
    cos = metrics.text_image_cosines(ours_enc.embed_texts(PROMPTS), ours_enc.embed_images(images))
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    direct = torch.sum(out.text_embeds * out.image_embeds, dim=-1).double().numpy()  # both unit-normalised
    torchmetrics_like = torch.clamp(100 * torch.from_numpy(direct), min=0).numpy()
    np.testing.assert_allclose(cos, direct, atol=1e-6)
    np.testing.assert_allclose(metrics.clipscore(cos), torchmetrics_like * 2.5 / 100, atol=1e-6)
    assert np.ptp(cos) > 1e-3  # distinct pairs, a real comparison
    np.testing.assert_allclose(metrics.clipscore(np.array([-0.2, 0.3])), [0.0, 0.75])  # w * max(cos, 0)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_dino_and_clip_i_equal_direct_computation(eval_models, photos, backend):
    """Mean pairwise cosine (generated x real) of DINO CLS tokens and CLIP image features, against torch; our
    image towers in JAX (the default) or through transformers."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    from customshift_jax.eval import metrics
    from customshift_jax.eval.encoders import IMAGENET_MEAN, IMAGENET_STD, ClipEncoder, DinoEncoder, read_image

    clip_dir, dino_dir = eval_models
    gen, real = [read_image(p) for p in photos[:2]], [read_image(p) for p in photos[1:]]
    gen[0] = gen[0].resize((300, 200))  # a wide one: the short side goes to 256, the long one is cropped
    dino, clip = DinoEncoder(dino_dir, backend=backend), ClipEncoder(clip_dir, backend=backend)
    assert dino.describe()["backend"] == clip.describe()["backend"] == backend
    ours_dino = metrics.mean_pairwise_cosine(dino.embed_images(gen), dino.embed_images(real))
    ours_clip = metrics.mean_pairwise_cosine(clip.embed_images(gen), clip.embed_images(real))
    # transformers' own resize-shortest-edge / centre-crop / normalise as the DINO preprocessing
    pre = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                             image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3)
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    def pairwise(a, b):
        return torch.nn.functional.cosine_similarity(a[:, None].double(), b[None].double(), dim=-1).mean().item()

    with torch.no_grad():
        cls = [vit(**pre(images=x, return_tensors="pt")).last_hidden_state[:, 0] for x in (gen, real)]
        feats = [model.get_image_features(**processor(images=x, return_tensors="pt")).pooler_output
                 for x in (gen, real)]
    assert abs(ours_dino - pairwise(*cls)) <= 1e-6
    assert abs(ours_clip - pairwise(*feats)) <= 1e-6
    assert abs(ours_dino - ours_clip) > 1e-3  # two different models, two different numbers


def test_dino_crop_rounds_as_torchvision():
    """CenterCrop's offset is round((w - 224) / 2) (torchvision), not floor: 343 x 256 crops from column 60."""
    from customshift_jax.eval.encoders import IMAGENET_MEAN, IMAGENET_STD, dino_pixels

    pixels = np.random.default_rng(0).integers(0, 256, (256, 343, 3), dtype=np.uint8)
    ours = dino_pixels(Image.fromarray(pixels))
    want = (pixels[16:240, 60:284].astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    np.testing.assert_allclose(ours, want.transpose(2, 0, 1), atol=1e-6)


def test_real_vs_real_leaves_out_self_pairs():
    from customshift_jax.eval import metrics

    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    want = (0 + 2 * np.sqrt(0.5)) * 2 / 6  # pairs (0,1), (0,2), (1,2), both orders, no (i, i)
    assert metrics.mean_real_vs_real(x) == pytest.approx(want, abs=1e-12)
