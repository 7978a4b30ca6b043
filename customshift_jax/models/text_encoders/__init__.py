"""SD3's text encoders in Flax Linen, exact to transformers: CLIP (`clip`) and T5 (`t5`) from their configs
(`config`), shared layers, the entry points (`api`), the transformers state-dict mapping and the params' logical
axes. Reading them from files is `io.transformers_folder`; prompt conditioning with them is `text.jax`."""
