"""Everything that touches disk: safetensors, diffusers folders, our orbax checkpoints, LoRA files,
conversion and export, loading a model from whatever the user points at, reference images."""
