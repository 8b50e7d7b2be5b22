#!/usr/bin/env bash
# Train an SGT on a Cloud TPU VM pod slice (v4 / v5e / v5p): create the slice, install sgt_jax on every
# worker, run `python -m sgt_jax.train --config ...` on all hosts at once.
#
#   launch/tpu_pod.sh all     configs/llama2_7b.yaml [key=value ...]   # create + install + run
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install
#   launch/tpu_pod.sh run     configs/llama2_7b.yaml [key=value ...]
#   launch/tpu_pod.sh logs    # tail worker 0's log
#   launch/tpu_pod.sh stop    # stop the run on all workers (SIGTERM: a preemption checkpoint is written)
#   launch/tpu_pod.sh delete
#
# Settings (environment; see launch/README.md): TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE, RUNTIME_VERSION,
# SPOT, REMOTE_DIR, JAX_TPU_PIP. Model, data and checkpoint paths in the config must be readable on every
# worker (a gs:// bucket for checkpoints, a disk or bucket mount for the model and data).
set -euo pipefail

TPU_NAME="${TPU_NAME:-sgt-pod}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-false}"
REMOTE_DIR="${REMOTE_DIR:-sgt_jax}"
JAX_TPU_PIP="${JAX_TPU_PIP:-jax[tpu]}"
LOG_FILE="${REMOTE_DIR}/train.log"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="${ZONE}" --project="${PROJECT}"
}

on_all_workers() {
  tpu ssh "${TPU_NAME}" --worker=all --command="$1"
}

create() {
  local extra=()
  if [[ "${SPOT}" == "true" ]]; then
    extra+=(--spot)
  fi
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
}

install() {
  # Ship the working tree (not a registry build) so every worker runs exactly this code.
  local archive
  archive="$(mktemp -d)/sgt_jax.tar.gz"
  tar -C "${REPO_ROOT}" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "${archive}" .
  tpu scp "${archive}" "${TPU_NAME}:sgt_jax.tar.gz" --worker=all
  on_all_workers "set -e
    mkdir -p ${REMOTE_DIR} && tar -xzf sgt_jax.tar.gz -C ${REMOTE_DIR}
    python3 -m venv ~/sgt_venv
    ~/sgt_venv/bin/pip install -q --upgrade pip
    ~/sgt_venv/bin/pip install -q '${JAX_TPU_PIP}' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    ~/sgt_venv/bin/pip install -q -e ${REMOTE_DIR}"
}

run() {
  local config="$1"
  shift
  local overrides=""
  local arg
  for arg in "$@"; do
    overrides+=" $(printf '%q' "${arg}")"
  done
  # Every host runs the same command; jax.distributed.initialize() (mesh.distributed=auto) finds the other
  # workers through the TPU metadata, so no coordinator address is passed.
  on_all_workers "cd ${REMOTE_DIR} && \
    TF_CPP_MIN_LOG_LEVEL=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TPU_STDERR_LOG_LEVEL=1 TPU_MIN_LOG_LEVEL=1 \
    LIBTPU_INIT_ARGS='--xla_tpu_enable_latency_hiding_scheduler=true --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_overlap_compute_collective_tc=true' \
    nohup ~/sgt_venv/bin/python -m sgt_jax.train --config $(printf '%q' "${config}") mesh.distributed=auto${overrides} \
      > ~/${LOG_FILE} 2>&1 < /dev/null &"
  echo "started on all workers of ${TPU_NAME}; follow with: $0 logs"
}

logs() {
  tpu ssh "${TPU_NAME}" --worker=0 --command="tail -n 50 -f ~/${LOG_FILE}"
}

stop() {
  on_all_workers "pkill -TERM -f 'sgt_jax.train' || true"
}

delete() {
  tpu delete "${TPU_NAME}" --quiet
}

command="${1:-}"
if [[ -z "${command}" ]]; then
  usage
fi
shift
case "${command}" in
  create) create ;;
  install) install ;;
  run)
    [[ $# -ge 1 ]] || usage
    run "$@"
    ;;
  all)
    [[ $# -ge 1 ]] || usage
    create
    install
    run "$@"
    ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
  *) usage ;;
esac
