#!/bin/bash
# Print a DeepSpeed hostfile (`HOST slots=N` per line) for the current SLURM allocation.
#   make-hostfile.sh GPUS_PER_NODE > hostfile
set -euo pipefail
SLOTS=${1:?usage: make-hostfile.sh GPUS_PER_NODE}
: "${SLURM_JOB_NODELIST:?run inside a SLURM allocation}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r host; do
  echo "$host slots=$SLOTS"
done
