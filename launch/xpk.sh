#!/usr/bin/env bash
# Submit a training workload to a GKE cluster with xpk (TPU slices, multi-slice, or GPU node pools).
#
#   CLUSTER=my-cluster TPU_TYPE=v6e-256 NUM_SLICES=2 IMAGE=gcr.io/my-proj/lumina-jax:latest \
#       bash launch/xpk.sh configs/train/lumina2_2b.yaml run_dir=gs://my-bucket/lumina2
#
# Runs `python -m lumina_jax train CONFIG key=value...` in every pod of the workload. With several
# slices JAX sees MEGASCALE_* variables, lumina_jax.parallel.mesh builds a hybrid ICI x DCN mesh and puts
# the slices on the data axis (mesh.dcn_data=-1, the default).
#
# Variables:
#   CLUSTER   (required) GKE cluster created with `xpk cluster create`
#   IMAGE     (required) docker image with the repo and its requirements installed (--docker-image)
#   TPU_TYPE  e.g. v5p-128, v6e-256 (TPU)   or   DEVICE_TYPE e.g. h100-80gb-8 (GPU; then NUM_NODES)
#   NUM_SLICES (TPU, default 1)   NUM_NODES (GPU, default 1)
#   WORKLOAD  name (default lumina-<user>-<date>, made a valid xpk name)   PROJECT, ZONE (default: gcloud's)
#   WORKDIR   directory of the repo inside the image (default /app)
#   LIBTPU_INIT_ARGS  exported in the command when set
#   DRY_RUN=1 print the xpk command instead of running it
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: CLUSTER=... IMAGE=... TPU_TYPE=... bash launch/xpk.sh CONFIG [key=value ...]" >&2
  exit 2
fi
: "${CLUSTER:?set CLUSTER}"
: "${IMAGE:?set IMAGE}"
if [[ -z "${WORKLOAD:-}" ]]; then
  # xpk workload names: [a-z]([-a-z0-9]*[a-z0-9])?, at most 40 characters. "lumina-" (7) + user (<= 23)
  # + "-MMDD-HHMM" (10): the user name is lower-cased, other characters become '-', trimmed to 23.
  user="$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')"
  user="${user:0:23}"
  user="$(printf '%s' "${user}" | sed -e 's/-*$//' -e 's/^-*//')"
  WORKLOAD="lumina-${user:-user}-$(date +%m%d-%H%M)"
fi
WORKDIR="${WORKDIR:-/app}"

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
inner="cd $(printf '%q' "${WORKDIR}")"
[[ -n "${LIBTPU_INIT_ARGS:-}" ]] && inner+=" && export LIBTPU_INIT_ARGS=$(printf '%q' "${LIBTPU_INIT_ARGS}")"
inner+=" && exec python -m lumina_jax train${args}"  # exec: SIGTERM reaches python (preemption checkpoint)

cmd=(xpk workload create --cluster "${CLUSTER}" --workload "${WORKLOAD}" --docker-image "${IMAGE}" --command "${inner}")
if [[ -n "${TPU_TYPE:-}" ]]; then
  cmd+=(--tpu-type "${TPU_TYPE}" --num-slices "${NUM_SLICES:-1}")
elif [[ -n "${DEVICE_TYPE:-}" ]]; then
  cmd+=(--device-type "${DEVICE_TYPE}" --num-nodes "${NUM_NODES:-1}")
else
  echo "set TPU_TYPE (e.g. v5p-128) or DEVICE_TYPE (e.g. h100-80gb-8)" >&2
  exit 2
fi
[[ -n "${PROJECT:-}" ]] && cmd+=(--project "${PROJECT}")
[[ -n "${ZONE:-}" ]] && cmd+=(--zone "${ZONE}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
