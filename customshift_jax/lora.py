"""Old import path of `customshift_jax.models.mmdit.lora` (README shows it)."""
from customshift_jax.models.mmdit.lora import *  # noqa: F401,F403
from customshift_jax.models.mmdit.lora import DEFAULT_TARGETS, LoRAConfig  # noqa: F401
