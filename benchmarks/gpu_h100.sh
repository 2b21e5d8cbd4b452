#!/usr/bin/env bash
# The GPU measurements of README "Speed": one H100, batch 256, 224 px, bfloat16, the real
# train step. Run from the repository root on the GPU machine (jax with CUDA, flax, optax):
#   OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh
# Records go to $OUT/results.jsonl (append them to benchmarks/results.jsonl), the
# compiled HLO of the first two models and of the s-major variant to $OUT. Each model runs
# in its own process.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qlhs_bench}
mkdir -p "$OUT"
R="$OUT/results.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
bench() {  # bench SECONDS ARGS...: one harness call under a time limit
  local limit=$1; shift
  echo "== $*"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.step --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" --steps "${STEPS:-20}" --warmup 3 --record "$R" "$@" 2>&1 | grep -v "^W0000\|^I0000" | tail -n 4
}
# In priority order: the headline row first.
bench 300 --model eq3_softball_ds --vs resnet50 --hlo-dir "$OUT"
bench 150 --model eq3_softball_ds --set 'hidden_layout="s_major"' --hlo-dir "$OUT"
bench 150 --model eq3_softball_ds --set 'remat="dots"'
bench 150 --model eq3_softball_ds --set 'd_impl="grouped"'
bench 150 --model eq3_softball_ds --set 'remat="full"'
bench 150 --model mobilenetv3_large_100
echo "== table"
python3 -m qlhs_jax.benchmarks.table "$R"
