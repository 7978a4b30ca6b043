"""`customshift crosscheck`: our JAX model against diffusers (`mmdit`) and CustomShift against the PyTorch
reference (`customshift`), row by row, within DESIGN section 7's bounds."""
