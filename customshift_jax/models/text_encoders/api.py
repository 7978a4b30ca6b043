"""The Flax text encoders' entry points: the module of a config (CLIP or T5) and its params' shapes."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from customshift_jax.models.text_encoders.clip import CLIPTextModelWithProjection
from customshift_jax.models.text_encoders.config import CLIPTextConfig, T5Config
from customshift_jax.models.text_encoders.t5 import T5EncoderModel

EncoderConfig = CLIPTextConfig | T5Config


def build_encoder(config: EncoderConfig, dtype: Any = jnp.float32, activation_sharding=None) -> nn.Module:
    """The Flax module of a config (CLIP or T5)."""
    cls = CLIPTextModelWithProjection if isinstance(config, CLIPTextConfig) else T5EncoderModel
    return cls(config, dtype=dtype, activation_sharding=activation_sharding)


def abstract_encoder_params(config: EncoderConfig) -> Any:
    """ShapeDtypeStructs of the params tree (fp32) of the encoder of `config`."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: build_encoder(config).init(jax.random.key(0), ids))["params"]
