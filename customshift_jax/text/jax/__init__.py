"""SD3's text conditioning in JAX: `JaxTextEncoders` over the Flax CLIP and T5 of `models.text_encoders` (exact to
transformers), their params read by `io.transformers_folder` or from our checkpoint."""
from customshift_jax.text.jax.encoders import JaxTextEncoders, make_encode_fn

__all__ = ["JaxTextEncoders", "make_encode_fn"]
