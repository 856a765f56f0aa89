#!/usr/bin/env bash
# Spark resource discovery script: the GPUs nvidia-smi sees, in the JSON Spark expects,
# e.g. {"name": "gpu", "addresses": ["0", "1"]}. Used when LAMBDALAKE_TRAIN_USE_GPU=true.
set -euo pipefail
addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -dc '0-9\n' | sed 's/.*/"&"/' | paste -sd, -)
printf '{"name": "gpu", "addresses": [%s]}\n' "${addresses}"
