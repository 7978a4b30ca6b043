"""The SD3 / SD3.5 MMDiT in Flax Linen (DESIGN section 3): config, layers, embeddings, attention, LoRA,
the model, the diffusers state-dict mapping, the logical axes of its params, and pure entry points (`api`)."""
from customshift_jax.models.mmdit import axes as _axes  # noqa: F401  (registers the params' logical axes)
