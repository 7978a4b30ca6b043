#!/usr/bin/env bash
# Conversion recipe: a diffusers SD3 folder -> our checkpoint (transformer, VAE, text encoders, content hashes),
# checked against diffusers number for number, and back to a diffusers folder with a trained LoRA.
#   convert/sd3_medium.sh /models/stable-diffusion-3-medium-diffusers ckpt/sd3-medium [runs/my-lora/lora]
set -euo pipefail
SRC="${1:?a diffusers SD3 folder}" DST="${2:?an output folder for our checkpoint}" LORA="${3:-}"
customshift convert "$SRC" "$DST"                  # weights as they are; refuses a DST that holds files
customshift crosscheck                             # our MMDiT and CustomShift against diffusers, tiny shapes
if [ -n "$LORA" ]; then
  customshift export "$DST" "$DST-diffusers" --lora "$LORA"   # a diffusers folder and PEFT LoRA files for PyTorch
fi
