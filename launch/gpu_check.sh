#!/usr/bin/env bash
# One-call correctness + speed check on a lent GPU machine (H100/H200), sized to fit ~9 minutes.
#
# Prepare here (once):   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# Run there (device tool): command "bash launch/gpu_check.sh", carry [".whl"], timeout_s 590.
# Results land in $OUT (gpu_check.log + one JSON per benchmark); copy the figures into BENCHMARKS.md.
#
# DRY_RUN=1 prints the steps without running them.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
run() {  # run <seconds> <name> <command...>
  local t=$1 name=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  timeout "$t" "$@" 2>&1 | grep -v -i "warning" | tee -a "$LOG"
}
if [ "${DRY_RUN:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
run 120 gpu-tests python3 -m pytest -q -m gpu tests/test_attention_kernels.py -p no:cacheprovider
run 90 attention python3 -m lumina_jax.bench attention --json "$OUT/attention.json"
run 240 forward-2b python3 -m lumina_jax.bench forward --config nextdit_2b --res 1024 1024 --batch 2 --dtype bf16 \
    --cap-valid 96 --cap-pad 256 --compile --json "$OUT/forward.json"
for b in pallas xla; do
  run 60 "forward-2b-$b" python3 -m lumina_jax.bench forward --config nextdit_2b --res 1024 1024 --batch 2 \
      --dtype bf16 --cap-valid 96 --cap-pad 256 --attention $b --reference none --iters 5 --json "$OUT/forward_$b.json"
done
run 60 text-encoder python3 -m lumina_jax.bench text-encoder --config gemma2_2b --batch 2 --seq-len 256 --json "$OUT/text.json"
run 60 vae-decode python3 -m lumina_jax.bench vae-decode --config vae_flux --res 1024 --json "$OUT/vae.json"
echo "done" | tee -a "$LOG"
