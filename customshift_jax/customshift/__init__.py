"""CustomShift (DESIGN section 4): the attention distribution shift (`cads`), the two branches on the base model
(`branches`: the Reference-Alignment prefill and the Cross-Guidance forward, with the logical axes of their
arguments that `ShardedFunction` lays them out by) and their samplers (`sampling`). The base model knows nothing
of this package."""
from customshift_jax.customshift.branches import (
    CUSTOMSHIFT_FORWARD_AXES,
    PREFILL_AXES,
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

__all__ = ["CUSTOMSHIFT_FORWARD_AXES", "PREFILL_AXES", "RefCache", "check_cache", "check_lora", "config_fingerprint",
           "customshift_apply", "init_lora", "lora_model", "lora_shapes", "make_customshift_forward", "make_prefill", "prefill"]
