#!/usr/bin/env bash
# CustomShift LoRA training on a TPU VM slice, every worker at once (docs/multihost.md, "v5p-64, step by step").
# Run from a machine with gcloud:  TPU=my-v5p-64 ZONE=us-east5-a DATA=/mnt/disks/data train/launch/tpu_vm.sh
# Plan it first on any CPU machine (nothing allocated):
#   customshift plan --topology v5p-64 --model sd3-medium --task train-lora --batch 32 --mesh fsdp=-1 --json plan.json
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}" "${DATA:?set DATA to the shared disk}"
REPO="${REPO:-https://github.com/YOUR-ORG/customshift-jax}"   # where your copy of this repository lives
CONFIG="${CONFIG:-train/configs/sd3_medium_v5p64.yaml}"
ALL=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command)

# 1. the code and the TPU build of jax on every worker
"${ALL[@]}" "test -d customshift-jax || git clone $REPO customshift-jax; cd customshift-jax && pip install -q -e '.[tpu]'"
# 2. our checkpoint of the weights, once, on worker 0 (skipped when it is there)
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=0 --command \
  "cd customshift-jax && test -f $DATA/ckpt/sd3-medium/customshift_checkpoint.json || \
   customshift convert $DATA/models/stable-diffusion-3-medium-diffusers $DATA/ckpt/sd3-medium"
# 3. the training pairs encoded once, each process its share, one index
"${ALL[@]}" "cd customshift-jax && test -f $DATA/data/shards/index.json || \
  customshift prepare $DATA/data/manifest.jsonl $DATA/data/shards --checkpoint $DATA/ckpt/sd3-medium \
    --text-encoders $DATA/ckpt/sd3-medium --text-backend jax --mesh fsdp=-1 --size 1024 --distributed"
# 4. training on the planned mesh; rerun this line after an interruption: it resumes exactly
"${ALL[@]}" "cd customshift-jax && customshift train --config $CONFIG --distributed"
