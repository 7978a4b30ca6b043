"""SD3 text conditioning (CLIP-L + CLIP-G + T5), equal to diffusers' `StableDiffusion3Pipeline.encode_prompt`.

The encoders are the PyTorch transformers models and run on the host; the result is numpy float32
arrays for the JAX side. torch and transformers are imported only when encoders are loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from customshift_jax.io.safe_files import atomic_write, read_npz

logger = logging.getLogger(__name__)

CLIP_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
_ARRAY_NAMES = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass
class PromptEmbeds:
    """SD3 conditioning: prompt_embeds (B, 77 + L, D), pooled (B, P), and optionally the negatives (CFG)."""

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.negative_prompt_embeds is None) != (self.negative_pooled_prompt_embeds is None):
            raise ValueError(
                "PromptEmbeds: negative_prompt_embeds and negative_pooled_prompt_embeds must both be given "
                "or both be None"
            )
        if self.prompt_embeds.ndim != 3 or self.pooled_prompt_embeds.ndim != 2:
            raise ValueError(
                f"PromptEmbeds: expected prompt_embeds (B, L, D) and pooled_prompt_embeds (B, P), got "
                f"{self.prompt_embeds.shape} and {self.pooled_prompt_embeds.shape}"
            )

    @property
    def has_negative(self) -> bool:
        """True when the classifier-free-guidance negatives are present."""
        return self.negative_prompt_embeds is not None

    def arrays(self) -> dict[str, np.ndarray]:
        """The present arrays by their canonical names."""
        return {k: getattr(self, k) for k in _ARRAY_NAMES if getattr(self, k) is not None}

    def save_npz(self, path: str | Path) -> Path:
        """Write the present arrays to `path` (.npz) atomically (temp file, then rename)."""
        path = Path(path)
        _atomic_savez(path, self.arrays())
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> "PromptEmbeds":
        """Read a file written by `save_npz`; a missing required array is an error that names it."""
        path = Path(path)
        data = read_npz(path, "prompt-embedding file")  # bounded: sizes checked from the zip and .npy headers
        present = set(data)
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if name not in present:
                raise KeyError(
                    f"{path} has no array {name!r} (found {sorted(present)}); expected {list(_ARRAY_NAMES[:2])} "
                    f"and optionally {list(_ARRAY_NAMES[2:])}"
                )
        neg = [n in present for n in _ARRAY_NAMES[2:]]
        if any(neg) and not all(neg):
            missing = _ARRAY_NAMES[2 + neg.index(False)]
            raise KeyError(f"{path} has one negative array but not {missing!r}; the negatives come in pairs")
        return cls(**{k: np.asarray(data[k], dtype=np.float32) for k in _ARRAY_NAMES if k in present})


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to an exclusive temp file in the target folder, then a rename: readers never see a partial file,
    and a symlink at `path` is refused, not written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, what="embeddings") as f:
        np.savez(f, **arrays)


def normalize_prompts(
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None,
    do_classifier_free_guidance: bool,
) -> tuple[list[str], list[str] | None]:
    """Prompts and negatives as `encode_prompt` resolves them: a None/empty negative is "" for every prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not do_classifier_free_guidance:
        return prompts, None
    negative = negative_prompts or ""
    negative = len(prompts) * [negative] if isinstance(negative, str) else list(negative)
    if len(negative) != len(prompts):
        raise ValueError(
            f"negative_prompts has batch size {len(negative)} but prompts has {len(prompts)}; pass one negative "
            "per prompt, a single string, or None"
        )
    if not all(isinstance(n, str) for n in negative):
        raise ValueError(f"negative_prompts must be strings, got {negative!r}")
    return prompts, negative


class PromptEncoder:
    """A text-encoder backend (PyTorch, JAX, or the cache over either): its own `encode_batch`, and `encode`, the
    one implementation of diffusers' `encode_prompt` outer logic over it."""

    def encode_batch(self, prompts: Sequence[str], *, max_sequence_length: int = 256, clip_skip: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt embeddings, no CFG/repeat: (B, 77 + max_sequence_length, D) and pooled (B, P), float32."""
        raise NotImplementedError

    def encode(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
               max_sequence_length: int = 256, do_classifier_free_guidance: bool = True,
               num_images_per_prompt: int = 1, clip_skip: int | None = None) -> PromptEmbeds:
        """`StableDiffusion3Pipeline.encode_prompt(prompts, negative_prompt=negative_prompts, ...)` as numpy float32.

        As in diffusers, `clip_skip` applies to the prompts only; the negatives always use clip_skip=None.
        """
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512] (diffusers' limit), got {max_sequence_length}")
        prompts, negative = normalize_prompts(prompts, negative_prompts, do_classifier_free_guidance)
        rep = lambda x: np.repeat(x, num_images_per_prompt, axis=0)  # noqa: E731 (x.repeat(1, n, 1).view(B*n, ...))
        embeds, pooled = self.encode_batch(prompts, max_sequence_length=max_sequence_length, clip_skip=clip_skip)
        out = PromptEmbeds(rep(embeds), rep(pooled))
        if negative is not None:
            neg, neg_pooled = self.encode_batch(negative, max_sequence_length=max_sequence_length, clip_skip=None)
            out = dataclasses.replace(out, negative_prompt_embeds=rep(neg),
                                      negative_pooled_prompt_embeds=rep(neg_pooled))
        return out


def _torch_dtype(dtype: str):
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def _listed_components(folder: Path) -> dict[str, bool] | None:
    """model_index.json's view: name -> listed with a class (True) or null (False); None without the file."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_file} is not readable JSON: {e}") from e
    return {
        k: bool(isinstance(v, list) and v and v[0] is not None)
        for k, v in index.items()
        if not k.startswith("_")
    }


def folder_identity(folder: str | Path, components: Sequence[str], extra: Any = None) -> str:
    """A hash naming the text encoders in `folder`.

    Small files (configs, tokenizers) count by content, weights by size and mtime (hashing GBs is too slow).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(components):
        sub = folder / name
        for f in sorted(p for p in sub.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(str(f.relative_to(folder)).encode() + b"\0")
            if f.suffix in (".json", ".txt", ".model") and st.st_size < 64 * 2**20:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def resolve_text_folder(
    pipeline_folder: str | Path, joint_attention_dim: int | None = None
) -> tuple[Path, dict[str, bool], int | None]:
    """(folder, which text components it has, the T5 slot's width): the checks both encoder backends share.

    CLIP-L and CLIP-G are required; without T5, `joint_attention_dim` defaults to transformer/config.json's.
    """
    folder = Path(pipeline_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {folder} does not exist (expected a diffusers SD3 folder)")
    listed = _listed_components(folder)

    def present(name: str) -> bool:
        if listed is not None and name in listed:
            if listed[name] and not (folder / name).is_dir():
                raise FileNotFoundError(f"{folder}/model_index.json lists {name!r} but {folder / name} is missing")
            return listed[name]
        return (folder / name).is_dir()

    names = [n for pair in (*CLIP_COMPONENTS, T5_COMPONENTS) for n in pair]
    have = {n: present(n) for n in names}
    if not any(have[enc] for enc, _ in (*CLIP_COMPONENTS, T5_COMPONENTS)):
        raise FileNotFoundError(
            f"{folder} has no text encoders (text_encoder, text_encoder_2, text_encoder_3 are null or missing); "
            "pass precomputed embeddings instead (PromptEmbeds.load_npz or prompt_embeds=...)"
        )
    missing = [n for pair in CLIP_COMPONENTS for n in pair if not have[n]]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {missing}: SD3 conditioning needs both CLIP encoders and tokenizers "
            "(T5 is optional); pass precomputed embeddings instead"
        )
    if have["text_encoder_3"] != have["tokenizer_3"]:
        lacking = "tokenizer_3" if have["text_encoder_3"] else "text_encoder_3"
        raise FileNotFoundError(f"{folder} has one of text_encoder_3/tokenizer_3 but not {lacking}")
    if not have["text_encoder_3"] and joint_attention_dim is None:
        cfg = folder / "transformer" / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(
                f"{folder} has no T5 and no transformer/config.json: pass joint_attention_dim (the T5 slot's width)"
            )
        joint_attention_dim = int(json.loads(cfg.read_text())["joint_attention_dim"])
    return folder, have, joint_attention_dim


def load_tokenizers(folder: Path, have: dict[str, bool]) -> dict[str, Any]:
    """The CLIP tokenizers and, where the folder has it, the T5 one (transformers, host side)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    def load_tok(cls_, name):
        try:
            return cls_.from_pretrained(folder / name)
        except Exception as e:  # noqa: BLE001 - re-raised with the path and what was expected
            raise ValueError(f"could not read tokenizer {folder / name} as {cls_.__name__}: {e}") from e

    out = {"tokenizer": load_tok(CLIPTokenizer, "tokenizer"), "tokenizer_2": load_tok(CLIPTokenizer, "tokenizer_2")}
    if have["tokenizer_3"]:
        out["tokenizer_3"] = load_tok(T5TokenizerFast, "tokenizer_3")
    return out


def text_folder_identity(folder: Path, have: dict[str, bool], joint_attention_dim: int | None, **extra: Any) -> str:
    """`folder_identity` of the text components present, with the zeros width when T5 is absent."""
    used = [n for n, present in have.items() if present]
    zeros_width = None if have["text_encoder_3"] else joint_attention_dim
    return folder_identity(folder, used, extra={**extra, "joint_attention_dim": zeros_width})


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, what: str) -> np.ndarray:
    """input_ids (B, max_length) as `encode_prompt` makes them (padded, truncated); warns what truncation removed."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="np").input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not np.array_equal(ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
        logger.warning("%s truncated to %d tokens; removed: %s", what, max_length, removed)
    return ids


class TextEncoders(PromptEncoder):
    """SD3's three text encoders and tokenizers (PyTorch, host side); `encode` equals `encode_prompt`.

    CLIP-L and CLIP-G are required; T5 is optional (absent: zeros of width `joint_attention_dim`, as diffusers).
    """

    def __init__(
        self,
        *,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
        joint_attention_dim: int | None = None,
        identity: str | None = None,
        device: str = "cpu",
    ) -> None:
        if text_encoder is None or tokenizer is None or text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError(
                "TextEncoders needs both CLIP encoders and their tokenizers (text_encoder[_2], tokenizer[_2])"
            )
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must both be given or both be None")
        if text_encoder_3 is None and joint_attention_dim is None:
            raise ValueError(
                "without T5 (text_encoder_3) the T5 slot is zeros of width joint_attention_dim: pass "
                "joint_attention_dim (the transformer's config value)"
            )
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.joint_attention_dim = joint_attention_dim
        self.device = device
        self.tokenizer_max_length = int(tokenizer.model_max_length)
        self._identity = identity

    @classmethod
    def from_pretrained(
        cls,
        pipeline_folder: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        joint_attention_dim: int | None = None,
    ) -> "TextEncoders":
        """Load whichever text encoders/tokenizers a local diffusers SD3 folder has (T5 may be absent).

        Without T5, `joint_attention_dim` defaults to the folder's transformer/config.json.
        """
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        folder, have, joint_attention_dim = resolve_text_folder(pipeline_folder, joint_attention_dim)
        torch_dtype = _torch_dtype(dtype)

        def load_enc(cls_, name):
            try:
                model = cls_.from_pretrained(folder / name, dtype=torch_dtype)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"could not load text encoder {folder / name} as {cls_.__name__}: {e}") from e
            return model.to(device).eval().requires_grad_(False)

        kw: dict[str, Any] = load_tokenizers(folder, have)
        kw["text_encoder"] = load_enc(CLIPTextModelWithProjection, "text_encoder")
        kw["text_encoder_2"] = load_enc(CLIPTextModelWithProjection, "text_encoder_2")
        if have["text_encoder_3"]:
            kw["text_encoder_3"] = load_enc(T5EncoderModel, "text_encoder_3")
        identity = text_folder_identity(folder, have, joint_attention_dim, dtype=dtype)
        return cls(**kw, joint_attention_dim=joint_attention_dim, identity=identity, device=device)

    @property
    def identity(self) -> str:
        """A stable hash of the encoders (folder files, or parameter contents when built from objects); cache key."""
        if self._identity is None:
            h = hashlib.sha256(json.dumps({"joint_attention_dim": self.joint_attention_dim}).encode())
            for enc in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
                if enc is None:
                    h.update(b"none")
                    continue
                h.update(enc.config.to_json_string().encode())
                for k, v in enc.state_dict().items():
                    h.update(k.encode() + str(v.dtype).encode())
                    h.update(v.detach().float().cpu().numpy().tobytes())
            for tok in (self.tokenizer, self.tokenizer_2, self.tokenizer_3):
                h.update(b"none" if tok is None else tok.backend_tokenizer.to_str().encode())
            self._identity = h.hexdigest()
        return self._identity

    @property
    def dtype(self):
        """The torch dtype of the CLIP-L encoder (diffusers casts the CLIP features and the T5 zeros to it)."""
        return self.text_encoder.dtype

    def _clip(self, index: int, prompts: list[str], clip_skip: int | None):
        """One CLIP: penultimate (or clip_skip) hidden states (B, 77, W) and the projected pooled output (B, P)."""
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        import torch

        ids = torch.from_numpy(tokenize(tokenizer, prompts, self.tokenizer_max_length, "CLIP input"))
        out = encoder(ids.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
        return hidden.to(dtype=self.dtype), out.text_embeds

    def _t5(self, prompts: list[str], max_sequence_length: int):
        """T5 last hidden state (B, max_sequence_length, D), or zeros of width joint_attention_dim without T5."""
        import torch

        if self.text_encoder_3 is None:
            return torch.zeros(
                (len(prompts), max_sequence_length, self.joint_attention_dim), device=self.device, dtype=self.dtype
            )
        ids = torch.from_numpy(tokenize(self.tokenizer_3, prompts, max_sequence_length, "T5 input"))
        return self.text_encoder_3(ids.to(self.device))[0].to(dtype=self.text_encoder_3.dtype)

    def encode_batch(
        self, prompts: Sequence[str], *, max_sequence_length: int = 256, clip_skip: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt embeddings, no CFG/repeat: (B, 77 + max_sequence_length, D) and pooled (B, P), float32."""
        import torch

        prompts = list(prompts)
        with torch.no_grad():
            embed_l, pooled_l = self._clip(0, prompts, clip_skip)
            embed_g, pooled_g = self._clip(1, prompts, clip_skip)
            clip = torch.cat([embed_l, embed_g], dim=-1)
            t5 = self._t5(prompts, max_sequence_length)
            if clip.shape[-1] > t5.shape[-1]:
                raise ValueError(
                    f"CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the T5 width {t5.shape[-1]}: "
                    "diffusers zero-pads CLIP up to the T5 width, so it must not be narrower"
                )
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([pooled_l, pooled_g], dim=-1)
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
