"""The metrics' image and text encoders from local transformers folders: the image towers in JAX (`vit_jax`,
faster here than PyTorch: bench/eval_encoders.py) or PyTorch (`backend="torch"`), the text tower in PyTorch.

DINO: a `ViTModel` (DINO v1 ViT-S/16; Dinov2 also read), the CLS token of `last_hidden_state`, on pixels resized
to 256 (short side, bicubic), centre-cropped to 224 and ImageNet-normalised, as DreamBooth's evaluation does.
CLIP: a `CLIPModel`'s projected image / text features, with the folder's own processor.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from customshift_jax.io.images import read_image as read_input_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE, DINO_CROP = 256, 224
DINO_TYPES = ("vit", "dinov2")
DINO_PREPROCESSING = (f"resize short side {DINO_RESIZE} bicubic (long side int(256 * long / short)), centre crop "
                      f"{DINO_CROP}, ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}")
CLIP_PREPROCESSING = "the folder's CLIPProcessor (image processor and tokenizer, text truncated to its length)"
BACKENDS = ("jax", "torch")


def read_image(path: str | Path):
    """An RGB PIL image read as every input image is (io.images: a bounded regular file, every mode to RGB); a
    ValueError naming the file when it cannot be read."""
    try:
        return read_input_image(path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def dino_pixels(image) -> np.ndarray:
    """(3, 224, 224) float32: torchvision's Resize(256, BICUBIC), CenterCrop(224), ToTensor, Normalize on PIL."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(DINO_RESIZE * long / short)
    size = (DINO_RESIZE, new_long) if w <= h else (new_long, DINO_RESIZE)
    image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = round((w - DINO_CROP) / 2.0), round((h - DINO_CROP) / 2.0)  # torchvision: round half to even
    image = image.crop((left, top, left + DINO_CROP, top + DINO_CROP))
    x = np.asarray(image, np.float32) / 255.0  # (224, 224, 3)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return x.transpose(2, 0, 1)


def _model_type(path: Path, flag: str, expected: Sequence[str], what: str) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{flag} {path}: no config.json; give a local transformers {what} folder.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {path}: config.json is not readable JSON ({e}).") from None
    if model_type not in expected:
        raise ValueError(f"{flag} {path} holds a {model_type!r} model; expected a {what} "
                         f"(model_type {' or '.join(map(repr, expected))}).")
    return model_type


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports and progress bars off while a metric model loads."""
    import transformers.utils.logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def model_identity(path: Path, kind: str) -> str:
    """A hash naming the model: configs by content, weights by size and modification time."""
    from customshift_jax.text.encode import folder_identity

    return folder_identity(path, ["."], extra=kind)


class _Encoder:
    """What both encoders share: the folder, its model type and identity, and how they embed."""

    kind = embedding = preprocessing = ""
    path: Path
    model_type: str
    identity: str

    backend = "torch"
    _jax_fn: Any = None

    def describe(self) -> dict[str, Any]:
        """The model and its preprocessing, for the output's protocol and models records."""
        return {"path": str(self.path), "model_type": self.model_type, "identity": self.identity,
                "embedding": self.embedding, "preprocessing": self.preprocessing, "backend": self.backend}

    def _use_jax(self, backend: str, forward: Callable, keep: Callable[[str], bool], config: Any) -> None:
        """Run the image tower as `forward(params, pixels)` in JAX, jitted, on the model's own weights."""
        if backend not in BACKENDS:
            raise ValueError(f"--backend {backend!r}: give one of {', '.join(BACKENDS)}.")
        if backend != "jax":
            return
        import functools

        import jax

        from customshift_jax.eval.vit_jax import jax_params

        params = jax_params(self.model.state_dict(), keep)
        fn = jax.jit(functools.partial(forward, heads=config.num_attention_heads, eps=config.layer_norm_eps,
                                       act=config.hidden_act))
        self.backend, self._jax_fn = "jax", lambda x: fn(params, x)

    def _run_jax(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, D), in batches padded to `batch_size` (one compile)."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start:start + self.batch_size]
            pad = np.zeros((self.batch_size - len(chunk), *chunk.shape[1:]), np.float32)
            out.append(np.asarray(self._jax_fn(np.concatenate([chunk, pad])))[:len(chunk)])
        return np.concatenate(out)


class DinoEncoder(_Encoder):
    """DINO ViT image embeddings (CLS token of the last hidden state, after the final layer norm)."""

    kind, embedding, preprocessing = "dino", "CLS token of last_hidden_state", DINO_PREPROCESSING

    def __init__(self, path: str | Path, batch_size: int = 32, backend: str = "jax"):
        import torch
        from transformers import AutoModel, ViTModel

        from customshift_jax.eval.vit_jax import vit_cls

        self.path = Path(path)
        self.model_type = _model_type(self.path, "--dino", DINO_TYPES, "DINO ViT (ViTModel, e.g. dino-vits16)")
        kw = dict(add_pooling_layer=False) if self.model_type == "vit" else {}  # the CLS token needs no pooler
        with _quiet_transformers():
            model = (ViTModel if self.model_type == "vit" else AutoModel).from_pretrained(self.path,
                                                                                        dtype=torch.float32, **kw)
        self.model = model.eval().requires_grad_(False)
        self.identity = model_identity(self.path, self.kind)
        self.batch_size = batch_size
        if self.model_type == "vit":  # Dinov2 (layer scale, SwiGLU options) stays in PyTorch
            self._use_jax(backend, vit_cls, lambda k: True, model.config)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, D) float32 embeddings of PIL images."""
        import torch

        pixels = np.stack([dino_pixels(im) for im in images])
        if self._jax_fn is not None:
            return self._run_jax(pixels)
        x = torch.from_numpy(pixels)
        with torch.no_grad():
            return self.model(pixel_values=x).last_hidden_state[:, 0].float().numpy()


def _features(out) -> Any:
    """transformers 5 returns the projected features as `pooler_output`; older ones the tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipEncoder(_Encoder):
    """CLIP image and text features (projected, not normalised) with the folder's processor."""

    kind, embedding, preprocessing = "clip", "get_image_features / get_text_features", CLIP_PREPROCESSING

    def __init__(self, path: str | Path, batch_size: int = 32, backend: str = "jax"):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from customshift_jax.eval.vit_jax import clip_image_features

        self.path = Path(path)
        self.model_type = _model_type(self.path, "--clip", ("clip",), "CLIP model (CLIPModel, e.g. ViT-B/32)")
        try:
            self.processor = CLIPProcessor.from_pretrained(self.path)
        except Exception as e:  # noqa: BLE001 - re-raised with the flag and what is expected
            raise ValueError(f"--clip {self.path}: its processor cannot be read ({type(e).__name__}: {e}); the "
                             "folder needs preprocessor_config.json and the tokenizer files.") from None
        with _quiet_transformers():
            self.model = CLIPModel.from_pretrained(self.path, dtype=torch.float32).eval().requires_grad_(False)
        self.identity = model_identity(self.path, self.kind)
        self.batch_size = batch_size
        self._use_jax(backend, clip_image_features,
                      lambda k: k.startswith("vision_model.") or k.startswith("visual_projection."),
                      self.model.config.vision_config)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        if self._jax_fn is not None:
            return self._run_jax(inputs["pixel_values"].numpy())
        with torch.no_grad():
            return _features(self.model.get_image_features(pixel_values=inputs["pixel_values"])).float().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return _features(out).float().numpy()
