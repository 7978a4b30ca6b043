"""customshift-jax: CustomShift (subject-driven customization on SD3) in JAX/Flax, exact to diffusers.

The names below load on first use, so that importing one submodule does not import the whole library.
Layout (docs/architecture.md): models/ (MMDiT, VAE), customshift/ (the method), sampling/, parallel/, io/, text/,
train/, pipeline.py, cli/. Prompt to images: `CustomShiftPipeline.from_pretrained(path)(prompt).images`.
"""
import importlib

_EXPORTS = {
    "MMDiTConfig": "customshift_jax.models.mmdit.config", "PRESETS": "customshift_jax.models.mmdit.config",
    "get_preset": "customshift_jax.models.mmdit.config", "init_mmdit": "customshift_jax.models.mmdit.api",
    "make_forward": "customshift_jax.models.mmdit.api", "mmdit_apply": "customshift_jax.models.mmdit.api",
    "param_shapes": "customshift_jax.models.mmdit.api", "RunOptions": "customshift_jax.models.mmdit.options",
    "load_transformer": "customshift_jax.io.loading",
    "params_from_state_dict": "customshift_jax.models.mmdit.mapping",
    "state_dict_from_params": "customshift_jax.models.mmdit.mapping",
    "StateDictMismatch": "customshift_jax.models.mmdit.mapping",
    "CustomShiftPipeline": "customshift_jax.customshift_pipeline",
    "CustomShiftPipelineOutput": "customshift_jax.customshift_pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'customshift_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
