#!/usr/bin/env bash
# Correctness + speed checks on a lent GPU machine (H100/H200): parts 1 and 2 sized for one short lease, part 3
# for a later one.
#
# Prepare here (once):   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata grain==0.2.18 array_record==0.8.6 portpicker
# Run there (device tool): command "bash launch/gpu_check.sh 1", carry [".whl"], kind nvidia-h200 (the
# reference figures in ../shared/bench and the first lease's are H200 ones; every ratio is still taken within
# one run), timeout_s 600; then at once (the machine stays warm ~30 s) "DEADLINE_S=<what is left, minus
# ~30 s> bash launch/gpu_check.sh 2", carry [".whl"] again (a machine that went cold in between starts bare).
# Part 3 is for a later lease. Without the wheels a part stops (exit 3).
# Time arithmetic (a lease is 15 min of device time, the machine's start included, ~2-3 min): part 1's caps
# sum to 535 s (deadline 555 s) for the figures that settle issues 3, 10, 8 and 2; part 2 gets what is left
# (~150-250 s): the training step (#6), then the kernel sweep. Part 3 (a lease of its own) starts with
# generate vs diffusers eager and torch.compile (#4, ~300 s: two torch compiles of the 2B transformer).
# First lease (2026-11-27, H200): part 1 took 452 s, part 2 246 s; figures in BENCHMARKS.md.
# Each part stops starting steps DEADLINE_S seconds after it began (default 555), and each step gets at
# most the time left, so the part ends inside the call's limit with what it measured.
# Results land in $OUT: gpu_check.log, results.tgz (one JSON per benchmark), *.xplane.pb.gz (xprof traces:
# `python -m lumina_jax.bench` docs say how to read them). Copy the figures into BENCHMARKS.md.
#
# Part "shapes" (issue 9, a lease of its own: ~9 min): the patch-4 shapes recipe (BUILD.md, "Patch-4
# experiment") at GPU scale, assembled and scored. Prepare here: `python -m lumina_jax.shapes prepare --work
# data/shapes` into a real folder (not a link: carry copies files), add the dataset reader's wheels to .whl
# (tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 dm-tree==0.1.10 immutabledict==4.3.1 toml==0.10.2,
# and `pip wheel --no-deps promise==2.3`), then run "bash launch/gpu_check.sh shapes", carry [".whl",
# "data/shapes"]. $OUT gets shapes_model/ (the pipeline folder, bf16 transformer), shapes_eval.json and
# shapes_metrics.jsonl. The trainer checkpoints every 250 steps, so a run cut by its limit still assembles.
#
# DRY_RUN=1 prints the steps without running them.
set -uo pipefail
PART=${1:-1}
case "$PART" in 1|2|3|shapes) ;; *) echo "gpu_check.sh: unknown part '$PART' (1, 2, 3 or shapes)" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
RES=/tmp/gpu_res_$PART; rm -rf "$RES"; mkdir -p "$RES"  # a warm machine keeps /tmp: each part packs its own
LOG="$OUT/gpu_check.log"
DEADLINE_S=${DEADLINE_S:-555}
T0=$SECONDS
# traces are gzipped into $OUT once, and the raw file removed (not packed again after every later step)
pack() { for f in "$RES"/*.xplane.pb; do [ -f "$f" ] && gzip -1 -c "$f" > "$OUT/$(basename "$f").gz" && rm -f "$f"; done; tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; true; }
step() {  # step <cap seconds> <name> <command...>: runs with min(cap, time left); skipped under 25 s left
  local cap=$1 name=$2; shift 2
  local left=$(( DEADLINE_S - (SECONDS - T0) )); local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 25 ]; then echo "=== $name: SKIPPED (${left}s left)" | tee -a "$LOG"; return 0; fi
  echo "=== $name (limit ${t}s, at $(( SECONDS - T0 ))s): $*" | tee -a "$LOG"
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  local s=$SECONDS
  timeout -k 5 "$t" "$@" 2>&1 | grep -v -i -E "warning|warn\(" | tee -a "$LOG"
  echo "=== $name: rc=${PIPESTATUS[0]} in $(( SECONDS - s ))s" | tee -a "$LOG"
  pack
}
WHEELS=$(ls .whl/*.whl 2>/dev/null | sort | tr '\n' ' ')
if [ "${DRY_RUN:-0}" != 1 ] && [ -n "$WHEELS" ] && [ "$(cat /tmp/site/.lumina_installed 2>/dev/null)" = "$WHEELS" ]; then
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}  # a later part on the warm machine: these wheels are installed
elif [ "${DRY_RUN:-0}" != 1 ] && [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "$WHEELS" > /tmp/site/.lumina_installed && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
B="python3 -m lumina_jax.bench"
F2B="--config nextdit_2b --res 1024 1024 --batch 2 --dtype bf16 --cap-valid 96 --cap-pad 256"
if [ "$PART" != shapes ]; then
  if [ "${DRY_RUN:-0}" != 1 ]; then
    [ "$PART" != 2 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    # the references need diffusers and the trainer grain (both from .whl): without them every step fails
    python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o, torch, diffusers, transformers, grain; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, \
'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'grain', grain.__version__, jax.devices())" 2>&1 | tail -2 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "missing packages: carry .whl (see the header)" | tee -a "$LOG"; pack; exit 3; }
  fi
fi
if [ "$PART" = 1 ]; then
  # Ordered by what a measurement can still settle: the GPU kernel tests (forward and the fixed backward,
  # ~15 s), then the benchmarks whose figure is the last thing an issue lacks (text encoder #3, 7B
  # captioner #10), then attention fwd/bwd (#8) and the 2B forward (#2).
  step 45 gpu-tests python3 -m pytest -q -m gpu tests/test_attention_kernels.py -p no:cacheprovider
  step 60 text-encoder $B text-encoder --config gemma2_2b --batch 2 --seq-len 256 --json "$RES/text.json"
  step 150 caption-7b $B caption --family qwen2_vl --size 7b --batch 4 --new-tokens 32 --iters 2 --json "$RES/caption.json"
  step 60 attention $B attention --backends xla cudnn pallas pallas_stock --json "$RES/attention.json"
  # cuDNN (auto), then diffusers eager + torch.compile in the same process right after it (the headline
  # ratio, before a time limit can cut it), then unrolled layers / fused q/k norm+RoPE and our kernel
  step 220 forward-2b $B forward $F2B --attention cudnn pallas --unroll --fused-qk --compile --warmup 2 --iters 10 \
      --profile "$RES/forward.xplane.pb" --hlo-dump "$RES/forward_hlo.txt" --json "$RES/forward.json"
elif [ "$PART" = shapes ]; then
  R=runs/shapes_p4_gpu
  step 330 shapes-train python3 -m lumina_jax train configs/train/shapes_p4.yaml run_dir=$R log.progress=false \
      stages.0.steps=1000 stages.0.batch=64 stages.1.steps=6000 stages.1.batch=64 checkpoint.keep_every=0
  [ "${DRY_RUN:-0}" = 1 ] || cp "$R/metrics.jsonl" "$OUT/shapes_metrics.jsonl"
  step 40 shapes-assemble python3 -m lumina_jax.shapes assemble --run $R --work data/shapes --vae vae --shift 6 --guidance 4 --out "$OUT/shapes_model"
  step 150 shapes-eval python3 -m lumina_jax eval-shapes --checkpoint "$OUT/shapes_model" --n 200 --cfg both \
      --json "$OUT/shapes_eval.json"
elif [ "$PART" = 2 ]; then
  # 4 micro-batches per optimizer update (AdamW + EMA over 2.6B fp32 params is ~20 ms of HBM traffic): micro-batch
  # 2, or 1 where 2 does not fit (an H100); out-of-memory attempts are rows in the JSON
  step 150 train-2b-1024 $B train --config nextdit_2b --res 1024 --batch 8 4 --grad-accum 4 --remat low_precision --steps 5 \
      --profile "$RES/train.xplane.pb" --json "$RES/train_1024.json"
  step 60 attention-sweep $B attention --sweep --iters 10 --warmup 1 --json "$RES/sweep.json"
else
  # the end-to-end pipeline vs diffusers eager and torch.compile (#4): torch.compile compiles the transformer
  # once per caption length the pipeline uses (prompt and negative: twice, ~60 s each on an H200)
  step 330 generate-2b $B generate --shapes 2b --steps 30 --cfg 4 --iters 2 --compile --json "$RES/generate.json"
  # random 2B weights drawn on the host (~70 s for DiT + Gemma) before the compile
  step 180 generate-2b-fast $B generate --shapes 2b --steps 30 --cfg 4 --iters 2 --no-diffusers --unroll --fused-qk \
      --json "$RES/generate_fast.json"
  # GEMMs reading the stacked weights in place instead of a per-layer copy (the 2.9 ms of memcpy seen 2026-11-27);
  # compare with part 1's forward-2b cuDNN row only on the same machine
  XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true step 60 forward-2b-dsf $B forward $F2B --attention cudnn \
      --reference none --warmup 2 --iters 10 --json "$RES/forward_dsf.json"
  step 120 train-2b-256 $B train --config nextdit_2b --res 256 --batch 16 8 --remat low_precision --steps 5 \
      --json "$RES/train_256.json"
  # LoRA fine-tuning step (frozen base, rank-16 side paths): vs the full step (no Adam/EMA of the base); the same
  # micro-batches as train-2b-1024 (--grad-accum 4)
  step 120 train-2b-1024-lora $B train --config nextdit_2b --res 1024 --batch 8 4 --grad-accum 4 --lora 16 \
      --remat low_precision --steps 5 --json "$RES/train_1024_lora.json"
fi
pack
echo "part $PART done at $(( SECONDS - T0 ))s" | tee -a "$LOG"
