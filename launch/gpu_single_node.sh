#!/usr/bin/env bash
# Train an SGT on one node with N GPUs: one process drives all of them (a (data, fsdp, tensor) mesh over the
# local devices, as the config's gpu: block sets it; no jax.distributed).
#
#   launch/gpu_single_node.sh configs/llama2_7b.yaml [key=value ...]
#   NUM_GPUS=4 launch/gpu_single_node.sh configs/mistral_7b_instruct.yaml mesh.fsdp=2
#
# Settings (environment; see launch/README.md): NUM_GPUS (default: all visible), PYTHON, XLA_FLAGS_EXTRA,
# MEM_FRACTION.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
config="$1"
shift

PYTHON="${PYTHON:-python}"
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS="$(nvidia-smi --list-gpus | wc -l)"
fi
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((NUM_GPUS - 1)))"
fi
export CUDA_VISIBLE_DEVICES

# Let XLA take most of each GPU up front (one process per node, nothing else on the GPUs).
export XLA_PYTHON_CLIENT_PREALLOCATE=true
export XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.90}"
# Overlap the gradient all-reduce / FSDP all-gathers with compute.
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS_EXTRA:-}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

# mesh.distributed=false: a single process, even inside a SLURM allocation (where "auto" would start
# jax.distributed). The attention kernel and the mesh come from the config's gpu: block, which applies on a
# GPU machine. Later key=value arguments override all of these.
exec "${PYTHON}" -m sgt_jax.train --config "${config}" mesh.distributed=false "$@"
