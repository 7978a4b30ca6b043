"""SD3's text encoders in JAX (Flax Linen CLIP and T5, exact to transformers), their loader and `JaxTextEncoders`."""
from customshift_jax.text.jax.clip import CLIPTextModelWithProjection
from customshift_jax.text.jax.config import CLIPTextConfig, T5Config, read_config
from customshift_jax.text.jax.encoders import JaxTextEncoders, make_encode_fn
from customshift_jax.text.jax.loading import load_encoder_params
from customshift_jax.text.jax.t5 import T5EncoderModel

__all__ = ["CLIPTextConfig", "CLIPTextModelWithProjection", "JaxTextEncoders", "T5Config", "T5EncoderModel",
           "load_encoder_params", "make_encode_fn", "read_config"]
