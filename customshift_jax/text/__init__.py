"""SD3 text conditioning on the host (PyTorch encoders, imported lazily) and its on-disk cache."""
from customshift_jax.text.cache import CachedTextEncoder
from customshift_jax.text.encode import PromptEmbeds, TextEncoders, folder_identity

__all__ = ["CachedTextEncoder", "PromptEmbeds", "TextEncoders", "folder_identity"]
