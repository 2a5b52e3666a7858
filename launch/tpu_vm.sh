#!/usr/bin/env bash
# Runs the pipeline on a Cloud TPU VM: a single host (v4-8, v5litepod-8, ...) or a pod slice
# (v4-32, ...), where every worker runs the same command and JAX joins them into one run.
#
#   launch/tpu_vm.sh create                 # create the TPU VM (all workers)
#   launch/tpu_vm.sh copy                   # the repository's HEAD (git archive) to every worker
#   launch/tpu_vm.sh install                # pip install the package with its [tpu] extra on every worker
#   launch/tpu_vm.sh mount                  # pod slices: mount BUCKET at MOUNT on every worker
#   launch/tpu_vm.sh run [flags...]         # python -m pmm_jax.main on every worker (--worker=all)
#   launch/tpu_vm.sh fetch                  # results, config, markers and TensorBoard logs from worker 0
#   launch/tpu_vm.sh delete                 # delete the TPU VM
#   launch/tpu_vm.sh all [flags...]         # create, copy, install, [mount,] run, fetch
#
# Extra flags go to pmm_jax.main, e.g. --config.seg.num_steps=100. Variables (defaults):
#   TPU_NAME (required)       name of the TPU VM
#   PROJECT                   gcloud project (gcloud's configured project)
#   ZONE (us-central2-b)      zone with quota for ACCELERATOR_TYPE
#   ACCELERATOR_TYPE (v4-8)   v4-8 = one host; v4-16 and larger = a pod slice (several workers)
#   RUNTIME_VERSION (tpu-ubuntu2204-base)
#   CONFIG (configs/demo.py)  config file and variant, e.g. configs/voc.py
#   WORKDIR (/tmp/pmm_run)    run directory ON THE WORKERS; a pod slice needs one every worker
#                             sees: set BUCKET and WORKDIR under MOUNT (e.g. /mnt/pmm/run)
#   BUCKET                    GCS bucket (no gs://) mounted with gcsfuse by `mount` and `all`
#   MOUNT (/mnt/pmm)          where the bucket is mounted
#   RESULTS (./results/TPU_NAME)  local folder `fetch` writes to
#   REMOTE_DIR (pmm-jax)      the repository copy in each worker's home
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, the name of the TPU VM}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/demo.py}"
WORKDIR="${WORKDIR:-/tmp/pmm_run}"
BUCKET="${BUCKET:-}"
MOUNT="${MOUNT:-/mnt/pmm}"
RESULTS="${RESULTS:-./results/${TPU_NAME}}"
REMOTE_DIR="${REMOTE_DIR:-pmm-jax}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"
}

# Runs a shell command on every worker at once.
on_all_workers() {
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

copy() {
  local archive
  archive="$(mktemp -d)/pmm-jax.tar.gz"
  git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  tpu scp "$archive" "$TPU_NAME:pmm-jax.tar.gz" --worker=all
  on_all_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/pmm-jax.tar.gz -C ~/$REMOTE_DIR"
  rm -f "$archive"
}

install() {
  on_all_workers "cd ~/$REMOTE_DIR && python3 -m pip install -q -U pip \
    && python3 -m pip install -q -e '.[tpu]' \
    && python3 -c 'import jax; print(jax.devices())'"
}

mount() {
  : "${BUCKET:?set BUCKET to a GCS bucket name to mount at MOUNT on every worker}"
  on_all_workers "set -e
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
}

run() {
  local extra=""
  if (($#)); then
    extra="$(printf '%q ' "$@")"
  fi
  # jax.distributed.initialize() finds the other workers itself (pmm_jax.training.distributed).
  on_all_workers "cd ~/$REMOTE_DIR && python3 -m pmm_jax.main --config=$CONFIG --workdir=$WORKDIR $extra"
}

fetch() {
  mkdir -p "$RESULTS"
  tpu ssh "$TPU_NAME" --worker=0 --command="cd $WORKDIR && tar -czf /tmp/pmm_results.tar.gz \
    --ignore-failed-read config.json results.json stages \$(find . -type d -name tb)"
  tpu scp "$TPU_NAME:/tmp/pmm_results.tar.gz" "$RESULTS/" --worker=0
  tar -xzf "$RESULTS/pmm_results.tar.gz" -C "$RESULTS"
  echo "results in $RESULTS"
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

main() {
  local step="${1:-}"
  shift || true
  case "$step" in
    create | copy | install | mount | fetch | delete) "$step" ;;
    run) run "$@" ;;
    all)
      create
      copy
      install
      if [[ -n "$BUCKET" ]]; then mount; fi
      run "$@"
      fetch
      ;;
    *)
      sed -n '2,28p' "${BASH_SOURCE[0]}"
      exit 2
      ;;
  esac
}

main "$@"
