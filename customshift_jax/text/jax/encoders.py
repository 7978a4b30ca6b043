"""SD3's text conditioning in JAX: `JaxTextEncoders`, the same interface as the PyTorch `TextEncoders`.

Tokenisation runs on the host (transformers' tokenizers); the three encoders and the diffusers assembly (CLIP-L and
CLIP-G hidden states concatenated, zero padded to the T5 width, then T5's tokens; pooled = both projections) are one
pure function, jitted once per shape bucket: batches are padded up to a bucket size so a long prompts file compiles
a handful of times. On a mesh the params are sharded by the MMDiT's rule sets and the batch is split.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from customshift_jax.io.checkpoint import (
    checkpoint_components,
    checkpoint_folder,
    is_checkpoint,
    load_checkpoint,
    load_checkpoint_config,
    read_marker,
)
from customshift_jax.io.text_encoders import ENCODERS
from customshift_jax.io.transformers_folder import load_encoder_params
from customshift_jax.models.text_encoders.api import EncoderConfig, abstract_encoder_params, build_encoder
from customshift_jax.models.text_encoders.axes import text_logical_axes
from customshift_jax.models.text_encoders.config import read_config
from customshift_jax.numerics import float_dtype
from customshift_jax.parallel.sharding import (
    RulesLike,
    activation_hook,
    as_rules,
    logical_sharding,
    param_shardings,
    shard_params,
)
from customshift_jax.text.encode import (
    PromptEncoder,
    load_tokenizers,
    resolve_text_folder,
    text_folder_identity,
    tokenize,
)
from customshift_jax.tree_paths import shape_mismatches

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def make_encode_fn(configs: dict[str, EncoderConfig], *, dtype: Any = jnp.float32, clip_skip: int | None = None,
                   joint_attention_dim: int | None = None,
                   activation_sharding: Callable | None = None) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """The pure `f(params, ids) -> (prompt_embeds (B, 77 + L, D), pooled (B, P))` of `encode_batch` (fp32 out).

    `params` and `ids` are dicts by component name ("text_encoder", "text_encoder_2", optionally
    "text_encoder_3"); ids (B, 77) for the CLIPs and (B, L) for T5. Without T5, `joint_attention_dim` zeros.
    """
    clips = [build_encoder(configs[n], dtype, activation_sharding) for n in ENCODERS[:2]]
    t5 = build_encoder(configs["text_encoder_3"], dtype, activation_sharding) if "text_encoder_3" in configs else None
    layer = -2 if clip_skip is None else -(clip_skip + 2)

    def encode(params: dict, ids: dict) -> tuple[jax.Array, jax.Array]:
        outs = [m.apply({"params": params[n]}, ids[n]) for m, n in zip(clips, ENCODERS[:2])]
        clip = jnp.concatenate([o["hidden_states"][layer] for o in outs], axis=-1)  # (B, 77, W_L + W_G)
        pooled = jnp.concatenate([o["text_embeds"] for o in outs], axis=-1)  # (B, P_L + P_G)
        if t5 is not None:
            t5_out = t5.apply({"params": params["text_encoder_3"]}, ids["text_encoder_3"])  # (B, L, D)
        else:
            t5_out = jnp.zeros((*ids["t5_shape"].shape, joint_attention_dim), jnp.float32)
        if clip.shape[-1] > t5_out.shape[-1]:
            raise ValueError(f"CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the T5 width {t5_out.shape[-1]}: "
                             "diffusers zero-pads CLIP up to the T5 width, so it must not be narrower")
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5_out.shape[-1] - clip.shape[-1])))
        return jnp.concatenate([clip, t5_out], axis=1), pooled

    return encode


def _fitted(config: EncoderConfig, params: Any, dtype: Any, where: Path) -> Any:
    """`params` as `dtype`, refused by name where a leaf is missing, extra or not of the shape `config` builds."""
    wrong = shape_mismatches(abstract_encoder_params(config), params)
    if wrong:
        raise ValueError(f"{where}: the stored params do not fit this config ({'; '.join(wrong)}); the checkpoint "
                         "is damaged or mixed: re-run `customshift convert`")
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), params)


def bucket_size(n: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """The smallest bucket >= n (rounded up to `multiple`, the batch's device count); n must fit the largest."""
    size = next(b for b in sorted(buckets) if b >= n)
    return math.ceil(size / multiple) * multiple


class JaxTextEncoders(PromptEncoder):
    """SD3's CLIP-L, CLIP-G and (optional) T5 in JAX with transformers' tokenizers; `encode` equals `encode_prompt`.

    Same interface as `TextEncoders` (`identity`, `encode_batch`, `encode`), so `CachedTextEncoder` and the
    commands take either. `dtype` "bfloat16" runs the matmuls in bf16 (params stored bf16) with norms and
    softmax in fp32. With `mesh`, params are sharded by `rules` (e.g. "fsdp", "fsdp_tp") and batches split.
    """

    def __init__(self, *, configs: dict[str, EncoderConfig], params: dict[str, Any], tokenizers: dict[str, Any],
                 joint_attention_dim: int | None = None, identity: str = "", dtype: str = "float32",
                 mesh: Mesh | None = None, rules: RulesLike = "fsdp",
                 batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> None:
        float_dtype(dtype)
        if "text_encoder_3" not in configs and joint_attention_dim is None:
            raise ValueError("without T5 (text_encoder_3) the T5 slot is zeros of width joint_attention_dim: pass "
                             "joint_attention_dim (the transformer's config value)")
        self.configs, self.tokenizers = dict(configs), dict(tokenizers)
        self.joint_attention_dim, self.dtype = joint_attention_dim, dtype
        self.mesh, self.rules = mesh, as_rules(rules)
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.tokenizer_max_length = int(tokenizers["tokenizer"].model_max_length)
        self._identity = identity
        self.params = self._place(params)
        self._jitted: dict[tuple, Callable] = {}

    @classmethod
    def from_pretrained(cls, pipeline_folder: str | Path, *, dtype: str = "float32",
                        joint_attention_dim: int | None = None, mesh: Mesh | None = None, rules: RulesLike = "fsdp",
                        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> JaxTextEncoders:
        """The encoders and tokenizers of a local diffusers SD3 folder (T5 may be absent), read tensor by tensor, or
        of our checkpoint holding them (`from_checkpoint`)."""
        if is_checkpoint(pipeline_folder) and {"text_encoder", "text_encoder_2"} <= set(
                checkpoint_components(pipeline_folder)):  # else: transformers folders kept beside our components
            return cls.from_checkpoint(pipeline_folder, dtype=dtype, joint_attention_dim=joint_attention_dim,
                                       mesh=mesh, rules=rules, batch_buckets=batch_buckets)
        float_dtype(dtype)
        folder, have, joint_attention_dim = resolve_text_folder(pipeline_folder, joint_attention_dim)
        configs, params = {}, {}
        for name in ENCODERS:
            if have[name]:
                configs[name], params[name] = load_encoder_params(folder / name, dtype=float_dtype(dtype))
        identity = text_folder_identity(folder, have, joint_attention_dim, dtype=dtype, backend="jax")
        return cls(configs=configs, params=params, tokenizers=load_tokenizers(folder, have),
                   joint_attention_dim=joint_attention_dim, identity=identity, dtype=dtype, mesh=mesh, rules=rules,
                   batch_buckets=batch_buckets)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, dtype: str = "float32", joint_attention_dim: int | None = None,
                        mesh: Mesh | None = None, rules: RulesLike = "fsdp",
                        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS, verify: bool = True) -> JaxTextEncoders:
        """The encoders and tokenizers stored in our checkpoint by `customshift convert --components text_encoders`,
        each piece and tokenizer file checked against its hash (`verify`), the params against their config.json."""
        float_dtype(dtype)
        path = Path(path)
        present = checkpoint_components(path)
        names = [n for n in ENCODERS if n in present]
        if not {"text_encoder", "text_encoder_2"} <= set(names):
            raise ValueError(f"{path}: no text encoders in this checkpoint (it holds {', '.join(present)}); convert "
                             "them with `customshift convert PIPELINE DST --components transformer,vae,text_encoders`"
                             " or pass --text-encoders PIPELINE_FOLDER")
        have = {"tokenizer": True, "tokenizer_2": True, "tokenizer_3": "text_encoder_3" in names}
        for tok in (t for t, wanted in have.items() if wanted):
            checkpoint_folder(path, tok, verify=verify)
        if "text_encoder_3" not in names and joint_attention_dim is None:
            if "transformer" not in present:
                raise ValueError(f"{path} holds no T5 and no transformer: pass joint_attention_dim (the T5 slot's "
                                 "width)")
            joint_attention_dim = load_checkpoint_config(path, "transformer").joint_attention_dim
        configs, params = {}, {}
        for name, (_, stored) in load_checkpoint(path, names, verify=verify).items():
            configs[name] = read_config(path / name / "config.json")
            params[name] = _fitted(configs[name], stored, float_dtype(dtype), path / name / "config.json")
        marker = read_marker(path)
        identity = hashlib.sha256(json.dumps({
            "components": {n: marker["components"][n].get("hashes") for n in names},
            "folders": {t: marker.get("folders", {}).get(t) for t, wanted in have.items() if wanted},
            "joint_attention_dim": None if "text_encoder_3" in names else joint_attention_dim,
            "dtype": dtype, "backend": "jax"}, sort_keys=True).encode()).hexdigest()
        return cls(configs=configs, params=params, tokenizers=load_tokenizers(path, have),
                   joint_attention_dim=joint_attention_dim, identity=identity, dtype=dtype, mesh=mesh, rules=rules,
                   batch_buckets=batch_buckets)

    @property
    def identity(self) -> str:
        """A hash naming the encoders (folder files, dtype, backend): the embeddings cache's key."""
        return self._identity

    def _place(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.mesh is None:
            return jax.tree_util.tree_map(jnp.asarray, params)
        return shard_params(params, self.mesh, self.rules, text_logical_axes)

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_sharding(("batch",), (math.prod(self.mesh.shape.values()),), self.mesh, self.rules).spec
        axes = () if not spec or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
        return math.prod(self.mesh.shape[a] for a in axes)

    def _function(self, ids: dict[str, np.ndarray], clip_skip: int | None) -> Callable:
        """The jitted encode for these id shapes (one per bucket, T5 length and clip_skip)."""
        key = (tuple((k, v.shape) for k, v in sorted(ids.items())), clip_skip)
        if key not in self._jitted:
            hook = None if self.mesh is None else activation_hook(self.mesh, self.rules)
            fn = make_encode_fn(self.configs, dtype=float_dtype(self.dtype), clip_skip=clip_skip,
                                joint_attention_dim=self.joint_attention_dim, activation_sharding=hook)
            if self.mesh is None:
                self._jitted[key] = jax.jit(fn)
            else:
                in_shardings = (param_shardings(self.params, self.mesh, self.rules, text_logical_axes),
                                self._ids_shardings(ids))
                self._jitted[key] = jax.jit(fn, in_shardings=in_shardings)
        return self._jitted[key]

    def _ids_shardings(self, ids: dict[str, np.ndarray]) -> dict[str, Any]:
        """The ids' layout on the mesh: split along "batch"."""
        return {k: logical_sharding(("batch",) + (None,) * (v.ndim - 1), v.shape, self.mesh, self.rules)
                for k, v in ids.items()}

    @property
    def compiled_shapes(self) -> int:
        """How many shape buckets have been jitted so far."""
        return len(self._jitted)

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> dict[str, np.ndarray]:
        """Host-side input ids by component, as `encode_prompt` tokenises (int32)."""
        ids = {n: tokenize(self.tokenizers[t], prompts, self.tokenizer_max_length, "CLIP input")
               for n, t in zip(ENCODERS[:2], ("tokenizer", "tokenizer_2"))}
        if "text_encoder_3" in self.configs:
            ids["text_encoder_3"] = tokenize(self.tokenizers["tokenizer_3"], prompts, max_sequence_length, "T5 input")
        else:  # only its shape reaches the function: the zeros' (B, L)
            ids["t5_shape"] = np.zeros((len(prompts), max_sequence_length), np.int32)
        return {k: v.astype(np.int32) for k, v in ids.items()}

    def _run(self, ids: dict[str, np.ndarray], clip_skip: int | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(next(iter(ids.values())))
        size = bucket_size(n, self.batch_buckets, self._batch_multiple())
        padded = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in ids.items()}
        fn = self._function(padded, clip_skip)
        if self.mesh is None:
            embeds, pooled = fn(self.params, padded)
        else:  # placed first: a job of several processes takes no numpy input for a sharded argument
            padded = jax.device_put(padded, self._ids_shardings(padded))
            with jax.set_mesh(self.mesh):
                embeds, pooled = fn(self.params, padded)
        return np.asarray(embeds)[:n], np.asarray(pooled)[:n]

    def encode_batch(self, prompts: Sequence[str], *, max_sequence_length: int = 256,
                     clip_skip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt embeddings, no CFG/repeat: (B, 77 + max_sequence_length, D) and pooled (B, P), float32."""
        prompts = list(prompts)
        ids = self.tokenize(prompts, max_sequence_length)
        step = self.batch_buckets[-1]
        parts = [self._run({k: v[i:i + step] for k, v in ids.items()}, clip_skip) for i in range(0, len(prompts), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
