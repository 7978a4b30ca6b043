"""The models, knowing nothing of CustomShift: the SD3 MMDiT (`mmdit/`) and the SD3 VAE (`vae/`)."""
