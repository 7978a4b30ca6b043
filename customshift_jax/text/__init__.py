"""SD3 text conditioning (PyTorch encoders on the host, imported lazily, or JAX ones: `load_text_encoders`) and its
on-disk cache."""
from customshift_jax.text.backends import TEXT_BACKENDS, load_text_encoders
from customshift_jax.text.cache import CachedTextEncoder
from customshift_jax.text.encode import PromptEmbeds, TextEncoders, folder_identity

__all__ = ["TEXT_BACKENDS", "CachedTextEncoder", "PromptEmbeds", "TextEncoders", "folder_identity", "load_text_encoders"]
