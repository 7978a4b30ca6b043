"""CustomShift (DESIGN section 4): the attention distribution shift (`cads`), the two branches on the base model
(`branches`: the Reference-Alignment prefill and the Cross-Guidance forward), their samplers (`sampling`) and
their sharded forms (`sharded`). The base model knows nothing of this package."""
from customshift_jax.customshift.branches import (
    RefCache,
    check_cache,
    check_lora,
    config_fingerprint,
    customshift_apply,
    init_lora,
    lora_model,
    lora_shapes,
    make_customshift_forward,
    make_prefill,
    prefill,
)

__all__ = ["RefCache", "check_cache", "check_lora", "config_fingerprint", "customshift_apply", "init_lora",
           "lora_model", "lora_shapes", "make_customshift_forward", "make_prefill", "prefill"]
