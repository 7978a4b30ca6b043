"""customshift-jax: CustomShift (subject-driven customization on SD3) in JAX/Flax, exact to diffusers."""
from customshift_jax.api import init_mmdit, load_transformer, make_forward, mmdit_apply, param_shapes
from customshift_jax.config import PRESETS, MMDiTConfig, get_preset
from customshift_jax.mapping import StateDictMismatch, params_from_state_dict, state_dict_from_params

__all__ = [
    "MMDiTConfig", "PRESETS", "get_preset", "init_mmdit", "load_transformer", "make_forward", "mmdit_apply",
    "param_shapes", "params_from_state_dict", "state_dict_from_params", "StateDictMismatch",
]
