"""The PyTorch reference of the CustomShift branches (diffusers' SD3 transformer with a CustomShift attention
processor): what `customshift crosscheck --customshift` and the parity tests compare against."""
