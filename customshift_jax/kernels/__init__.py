"""Fused attention kernels (Pallas): flash attention returning the log-sum-exp, and the CustomShift shift fused
into it. Imports nothing from the models; `models.mmdit.attention` selects it as backend "flash"."""
from customshift_jax.kernels.blocks import BlockSizes
from customshift_jax.kernels.flash_attention import flash_attention, shifted_flash_attention

__all__ = ["BlockSizes", "flash_attention", "shifted_flash_attention"]
