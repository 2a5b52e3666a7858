#!/usr/bin/env bash
# Runs the pipeline on one host with one or more NVIDIA GPUs.
#
#   launch/multi_gpu.sh [flags...]          # flags go to pmm_jax.main, e.g. --config.seg.num_steps=100
#
# One process drives every visible GPU: the "data" mesh axis spans them, batches are split
# over them and the model is replicated (pmm_jax.training.sharding). Global batch sizes
# (config.cls.batch_size, config.seg.batch_size, config.cam.batch_size, config.eval.batch_size)
# must be multiples of the GPU count; the run stops with the setting to change otherwise.
# Variables (defaults):
#   CONFIG (configs/demo.py)     config file and variant, e.g. configs/voc.py
#   WORKDIR (/tmp/pmm_run)       run directory; rerunning the same command resumes
#   CUDA_VISIBLE_DEVICES         which GPUs to use (all when unset)
#   INSTALL (0)                  1 = first pip install the package with its [cuda12] extra here
#   PYTHON (python3)             interpreter of the environment to use
set -euo pipefail

CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-/tmp/pmm_run}"
INSTALL="${INSTALL:-0}"
PYTHON="${PYTHON:-python3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

cd "$REPO_ROOT"
if [[ "$INSTALL" == 1 ]]; then
  "$PYTHON" -m pip install -q -e '.[cuda12]'
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
"$PYTHON" -c 'import jax; print(f"JAX sees {jax.device_count()} device(s): {jax.devices()}")'
# TensorFlow (input pipeline only) is kept off the GPUs by pmm_jax.data.pipeline; JAX may take
# most of the GPU memory up front, which is what it is for here.
exec "$PYTHON" -m pmm_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
