"""PyTorch <-> orbax converters (DESIGN section 6): diffusers folders and original single-file SD3 / SD3.5
checkpoints into our checkpoint format (`convert`), and back to diffusers folders (`export`)."""
from customshift_jax.io.convert import CONVERTERS, ComponentConverter, Plan, convert, plan_conversion
from customshift_jax.io.export import export
from customshift_jax.io.single_file import infer_transformer_config, infer_vae_config

__all__ = ["CONVERTERS", "ComponentConverter", "Plan", "convert", "export", "infer_transformer_config",
           "infer_vae_config", "plan_conversion"]
