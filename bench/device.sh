#!/usr/bin/env bash
# GPU check of the flash kernels (under 5 minutes on one H100/H200): kernel vs xla error and time at SD3-medium
# width, 1024 px, bf16, forward and a training step, then the 28-step CustomShift sampler (xla vs flash, and both
# against the PyTorch reference processors in diffusers' scheduler loop); prints ratios, errors and MFU.
# Usage: bash bench/device.sh [--skip-sampler] [--layers N] [--peak-tflops T]. Refuses in one line without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: bench/device.sh needs an NVIDIA GPU (nvidia-smi finds none); run it on a GPU machine." >&2
    exit 2
fi
nvidia-smi -L
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
timeout 290 python bench/device_flash.py "$@"
