#!/usr/bin/env bash
# The GPU measurements of README "Speed": one H100, batch 256, 224 px, bfloat16, the real
# train step. Run from the repository root on the GPU machine (jax with CUDA, flax, optax):
#   OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh [fused|variants|all]
# "fused" (the default; its time limits add up to 500 s, so it fits one 10-minute device
# call; not yet run on a GPU): the
# BN(D u)*c operation alone per implementation (agreement check, then times), Eq.(3) vs
# ResNet50, and Eq.(3) with fuse_d_bn="pallas" and "xla". "variants": the s-major layout,
# remat, grouped D, MobileNetV3, and three other Pallas tilings. Records go to
# $OUT/results.jsonl (append them to benchmarks/results.jsonl), compiled HLO to $OUT. Each
# model runs in its own process; a step that fails or runs over its limit is reported and
# the script goes on.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qlhs_bench}
PART=${1:-fused}
case "$PART" in fused|variants|all) ;; *) echo "usage: $0 [fused|variants|all]" >&2; exit 2;; esac
mkdir -p "$OUT"
R="$OUT/results.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
quiet() { grep -v "^W0000\|^I0000"; }
bench() {  # bench SECONDS ARGS...: one harness call under a time limit
  local limit=$1; shift
  echo "== $*"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.step --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" --steps "${STEPS:-20}" --warmup 3 --record "$R" "$@" 2>&1 | quiet | tail -n 4
}
fused_op() {  # fused_op SECONDS: the operation alone (exit 1 = the implementations disagree)
  echo "== benchmarks.fused ${QLHS_PALLAS_TILING:+tiling $QLHS_PALLAS_TILING}"
  timeout "$1" python3 -m qlhs_jax.benchmarks.fused --batch "${BATCH:-256}" --record "$R" 2>&1 \
    | quiet | tail -n 20
  echo "exit ${PIPESTATUS[0]}"
}
if [ "$PART" != variants ]; then  # in priority order: the headline rows first
  fused_op 130
  bench 170 --model eq3_softball_ds --vs resnet50 --hlo-dir "$OUT"
  bench 100 --model eq3_softball_ds --set 'fuse_d_bn="pallas"' --hlo-dir "$OUT"
  bench 100 --model eq3_softball_ds --set 'fuse_d_bn="xla"'
fi
if [ "$PART" != fused ]; then
  bench 100 --model eq3_softball_ds --set 'hidden_layout="s_major"' --hlo-dir "$OUT"
  QLHS_PALLAS_TILING=4,4096,4 fused_op 100
  QLHS_PALLAS_TILING=4,1024,4 fused_op 100
  QLHS_PALLAS_TILING=8,2048,8 fused_op 100
  bench 100 --model eq3_softball_ds --set 'remat="dots"'
  bench 100 --model eq3_softball_ds --set 'd_impl="grouped"'
  bench 100 --model mobilenetv3_large_100
fi
echo "== table"
python3 -m qlhs_jax.benchmarks.table "$R"
