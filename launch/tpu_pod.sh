#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4 / v5e / v5p / v6e pod) over ssh.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-proj bash launch/tpu_pod.sh \
#       configs/train/lumina2_2b.yaml run_dir=gs://my-bucket/lumina2 mesh.fsdp=-1
#
# Runs `python -m lumina_jax train CONFIG key=value...` on all workers at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`) with LUMINA_TPU_POD=1: lumina_jax.parallel.distributed
# then calls jax.distributed.initialize(), which reads the slice from the TPU VM's metadata (a Cloud TPU
# VM has no TPU_WORKER_HOSTNAMES variable), so no coordinator flags are needed. Without it the processes
# would run without a distributed client: no async orbax saves, no preemption checkpoints.
# run_dir must be shared by all workers (a gs:// bucket).
#
# Variables:
#   TPU_NAME   (required) TPU VM name          ZONE (required)      PROJECT (default: gcloud's)
#   REPO_DIR   checkout on the workers (default: ~/lumina-jax)
#   VENV       venv to activate on the workers (default: ~/venv; empty: none)
#   SETUP      optional command run first on every worker (e.g. "git -C ~/lumina-jax pull")
#   LIBTPU_INIT_ARGS  passed through (XLA TPU flags, e.g. async collective fusion)
#   DRY_RUN=1  print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... bash launch/tpu_pod.sh CONFIG [key=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/lumina-jax}"
VENV="${VENV-~/venv}"

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
# quoted for the remote shell, a leading ~/ left bare so that it expands there (paths with spaces work)
rq() { if [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"; else printf '%q' "$1"; fi; }
remote="set -e; cd $(rq "${REPO_DIR}")"
[[ -n "${VENV}" ]] && remote+="; source $(rq "${VENV}")/bin/activate"
[[ -n "${SETUP:-}" ]] && remote+="; ${SETUP}"
[[ -n "${LIBTPU_INIT_ARGS:-}" ]] && remote+="; export LIBTPU_INIT_ARGS=$(printf '%q' "${LIBTPU_INIT_ARGS}")"
remote+="; export LUMINA_TPU_POD=1; exec python -m lumina_jax train${args}"  # exec: SIGTERM reaches python

cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="${remote}")
[[ -n "${PROJECT:-}" ]] && cmd+=(--project="${PROJECT}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
