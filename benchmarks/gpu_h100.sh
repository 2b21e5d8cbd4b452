#!/usr/bin/env bash
# The GPU measurements of README "Speed": one H100, batch 256, 224 px, bfloat16, the real
# train step. Run from the repository root on the GPU machine (jax with CUDA, flax, optax):
#   OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh [op|step|variants|all]
# Start with "step" (the fused candidates; the second device session of 2026-11-27 ran
# it in 220 s after fixing their statistics reduction, NOTES.md experiment 11); a
# 15-minute device session then has room for "variants" or "op" as a second call (the
# machine stays warm). "op" prints the fastest Pallas tiling.
# "op" (time limits add up to 380 s): the BN(D u)*c operation alone
#   (benchmarks.fused): agreement with the float64 reference, forward+backward of
#   none/xla/pallas with the default tiling and every pass alone (--passes; du in both
#   QLHS_DU_FORM forms), then the Pallas kernels alone with three other tilings (all
#   channels of a pixel in one tile, the columns split; 8 warps).
# "step" (570 s): benchmarks.block_tune (NOTES.md experiment 9) times each of
#   fuse_d_bn="block"'s three kernels alone at up to five tiles per block shape (six at
#   widths >= 256: 16 warps too; the sums kernel also at wider slices of hidden channels:
#   fewer re-reads of u and dy), the fastest becoming QLHS_BLOCK_TILING, and the hidden
#   path against "xla" per shape, which gives block_max_width (blocks wider than it take
#   "xla": the kernels' on-chip re-reads grow as n^3); then Eq.(3) with
#   fuse_d_bn="block" (27.2 GB per step in the deviceless compile, ResNet50 98.2 GB: the
#   1x1 matmuls inside Pallas kernels, NOTES.md experiment 8; 1,605 img/s on the H100,
#   0.30x ResNet50) against ResNet50, with a profile of the Eq.(3) step;
#   benchmarks.block_check then compares the kernels at that tiling with float64 on the
#   device (exit 1: do not trust the row); last, fuse_d_bn="xla" alone (64.9 GB; 2,074
#   img/s). (Bytes: benchmarks.aot, jax 0.11.2, --gemm triton.)
# "variants" (550 s): fuse_d_bn="block" at block_max_width 0 (every block) and 64,
#   at QLHS_BLOCK_TILING (after "step" in the same call: the tuned tiles); ResNet50 with JAX's own max-pool gradient (stem_pool="autodiff",
#   102.1 GB: what the stem's argmax pool gives both models); Eq.(3) with
#   d_impl="shifted_t" and pin_hidden_layout (83.6 GB); the s-major layout;
#   MobileNetV3; the plain Eq.(3) (101.4 GB; 4,489 img/s on an H100 before). (Measured
#   before, so left out: fuse_d_bn="pallas", 0.94x the plain step on the H100;
#   d_impl="grouped", 0.59x on the H200; remat="dots", 0.88x. Dropped for time: s-major
#   with shifted_t + pinned, and the pinned layout alone.)
# Records go to $OUT/results.jsonl (append them to benchmarks/results.jsonl), compiled
# HLO to $OUT/hlo.tar, everything printed to $OUT/log.txt. "step" also profiles its
# "block" row's Eq.(3) step (3 traced steps of a second compile without XLA's command
# buffers, after the timing is printed and recorded; a profile still going 120 s later is
# stopped): per-kernel device time, bytes and GB/s in log.txt, the
# times in $OUT/kernels.jsonl (offline: python -m qlhs_jax.benchmarks.kernel_times
# kernels.jsonl <model>.train.hlo.txt.gz, after tar xf hlo.tar). With BRING=DIR (the
# device tool's $OUT: $OUT there starts empty on every call, and at most 8 files come
# back) those five files are copied to DIR after every row (a run cut off keeps what
# finished):
#   BRING=$OUT OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh step
# Each model runs in its own process; a
# step that fails or runs over its limit is reported and the script goes on. A CPU smoke
# run of the script itself: OUT=/tmp/smoke BATCH=2 SIZE=32 STEPS=1 CHECK_BATCH=1
# FUSED_ARGS="--size-scale 8 --check-batch 2 --steps 1 --warmup 0" TUNE_ARGS="--size-scale 7
# --tilings 16,4 --calls 1 --repeats 1" bash benchmarks/gpu_h100.sh all
# (~14 minutes on 2 cores). In seconds, tests/benchmarks/test_gpu_h100_script.py checks
# every flag it passes against its module's parser and builds every model and override it
# times, so a renamed flag or model field fails on the CPU, not in the GPU session.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qlhs_bench}
PART=${1:-step}
case "$PART" in op|step|variants|all) ;; *) echo "usage: $0 [op|step|variants|all]" >&2; exit 2;; esac
mkdir -p "$OUT"
R="$OUT/results.jsonl"
H="$OUT/hlo"  # packed into $OUT/hlo.tar at the end: few files travel back
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
quiet() { grep -v "^W0000\|^I0000"; }
bring() {  # pack the HLO dumped so far; with BRING, copy the files there. After every
  # call, not only at the end: a session cut off by the device tool's limit keeps the rows
  # that finished.
  if [ -d "$H" ]; then tar rf "$OUT/hlo.tar" -C "$OUT" hlo && rm -r "$H"; fi
  if [ -n "${BRING:-}" ]; then
    for f in log.txt results.jsonl kernels.jsonl gpu.txt hlo.tar; do
      [ -f "$OUT/$f" ] && cp "$OUT/$f" "$BRING/"
    done
  fi
  return 0
}
bench() {  # bench SECONDS ARGS...: one harness call under a time limit
  local limit=$1; shift
  echo "== $* ${QLHS_PALLAS_TILING:+(tiling $QLHS_PALLAS_TILING)}${QLHS_BLOCK_TILING:+(block tiling $QLHS_BLOCK_TILING)}" \
    | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.step --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" --steps "${STEPS:-20}" --warmup 3 --record "$R" "$@" 2>&1 \
    | quiet | tee -a "$OUT/log.txt" \
    | grep -E "^(model|ratio|timed) |^[a-z][a-z0-9_]+ +[a-z]+:|stopped|failed|rror|Killed" \
    | tail -n 10
  bring
}
fused_op() {  # fused_op SECONDS ARGS...: the operation alone (exit 1 = disagreement)
  local limit=$1; shift
  echo "== benchmarks.fused $* ${QLHS_PALLAS_TILING:+(tiling $QLHS_PALLAS_TILING)}" \
    | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.fused --batch "${BATCH:-256}" \
    --record "$R" ${FUSED_ARGS:-} "$@" 2>&1 | quiet | tee -a "$OUT/log.txt" \
    | tail -n "${TAIL:-20}"
  echo "exit ${PIPESTATUS[0]}"
  bring
}
if [ "$PART" = op ] || [ "$PART" = all ]; then
  TAIL=80 fused_op 200 --passes
  for t in 4,4096,4,16 4,8192,8,32 4,2048,4,8; do
    TAIL=10 QLHS_PALLAS_TILING=$t fused_op 60 --impls pallas
  done
  echo "best tiling: $(python3 -m qlhs_jax.benchmarks.fused --best-of "$R")"
fi
if [ "$PART" = step ] || [ "$PART" = all ]; then
  # Each "block" kernel's fastest tile per block shape, timed alone; its last "tiling:"
  # line (complete after every shape, so a cut-off run still leaves one) is the
  # QLHS_BLOCK_TILING of the step and the check below. A budget of 55 s covered stages
  # 1-2 only on 2026-11-27 (the sums kernel's tile made 3x at stage 1): 140 s for all.
  echo "== benchmarks.block_tune" | tee -a "$OUT/log.txt"
  timeout 170 python3 -m qlhs_jax.benchmarks.block_tune --batch "${BATCH:-256}" --budget 140 \
    --record "$R" ${TUNE_ARGS:-} 2>&1 | quiet | tee -a "$OUT/log.txt" > "$OUT/tune.txt"
  echo "exit ${PIPESTATUS[0]}"
  # The picks (each kernel's row of times is in log.txt).
  grep -E "^[a-z][a-z0-9_]* \(|^  (forward|sums|dx|hidden path)|^(the kernels|hidden paths|budget)|rror" \
    "$OUT/tune.txt" | sed -E 's/^  (forward|sums|dx) .* -> /  \1 -> /' | cut -c1-150
  tuned=$(sed -n 's/^tiling: //p' "$OUT/tune.txt" | tail -n 1)
  if [ -n "$tuned" ]; then export QLHS_BLOCK_TILING="$tuned"; fi
  # Blocks wider than this take "xla". None timed: 128, the pick of the on-chip traffic
  # estimate (block_tune --l2, NOTES.md experiment 9). 1 ("xla" everywhere, timed below
  # anyway): the kernels everywhere instead, for the record.
  width=$(sed -n 's/^block_max_width: //p' "$OUT/tune.txt" | tail -n 1)
  width=${width:-128}
  if [ "$width" = 1 ]; then width=0; fi
  echo "QLHS_BLOCK_TILING=${QLHS_BLOCK_TILING:-(unset: the default tiling)}" \
    "block_max_width=$width" | tee -a "$OUT/log.txt"
  bring
  # The candidate against ResNet50, with a profile of the candidate (compiled without
  # command buffers, so that the backward kernels are seen one by one).
  bench 230 --model eq3_softball_ds --set 'fuse_d_bn="block"' --set "block_max_width=$width" \
    --vs resnet50 --hlo-dir "$H" --profile-dir "$OUT"
  # After the timing, so that it cannot crowd it out (50 s covered stage 1 alone): the
  # kernels at these tiles against float64 on the device (exit 1: do not trust the row).
  echo "== benchmarks.block_check" | tee -a "$OUT/log.txt"
  timeout 90 python3 -m qlhs_jax.benchmarks.block_check --batch "${CHECK_BATCH:-4}" 2>&1 \
    | quiet | tee -a "$OUT/log.txt" | grep -E "WRONG|agree|DISAGREE|rror" | tail -n 6
  echo "exit ${PIPESTATUS[0]}"
  bring
  # "xla" alone (its ratio: the ResNet50 above, same machine and session).
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="xla"' --hlo-dir "$H"
fi
if [ "$PART" = variants ] || [ "$PART" = all ]; then
  for w in 0 64; do
    bench 80 --model eq3_softball_ds --set 'fuse_d_bn="block"' --set "block_max_width=$w"
  done
  bench 80 --model resnet50 --set 'stem_pool="autodiff"'
  bench 80 --model eq3_softball_ds --set 'd_impl="shifted_t"' --set pin_hidden_layout=true \
    --hlo-dir "$H"
  bench 80 --model eq3_softball_ds --set 'hidden_layout="s_major"' --hlo-dir "$H"
  bench 80 --model mobilenetv3_large_100
  bench 70 --model eq3_softball_ds --hlo-dir "$H"
fi
echo "== table"
python3 -m qlhs_jax.benchmarks.table "$R" | tee -a "$OUT/log.txt"
bring
