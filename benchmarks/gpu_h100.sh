#!/usr/bin/env bash
# The GPU measurements of README "Speed": one H100, batch 256, 224 px, bfloat16, the real
# train step. Run from the repository root on the GPU machine (jax with CUDA, flax, optax):
#   OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh [op|step|profile|stem|eq3|sweep|pool|fma|sums|product|c_kernels|dot_forms|ablate|tiles|ncu|block|variants|configs|input|host|all]
# "profile", "stem" and "eq3" ran on 2026-12-04 (NOTES.md experiment 23); nothing since.
# Next: "dot_forms" (experiments 40-54: the default step against ResNet50 on the H100,
# then every dot form with c and dp stored, with both made in the kernels, and with C's
# and A's gradients summed in pass 4, u's shares in du's kernel and A applied in the
# product's kernel too; limits of 530 s, the one call that says whether the opt-in
# kernels of experiments 40-54 win), then, with the device time left, "c_kernels" (the
# made forms' values checked on the device, then c made alone), "ablate" (the stack
# without each of its last three pieces), "tiles" (the stack at the latency model's
# tiles against those before, and with its taps copied past L1, 360 s) or "eq3" with
# the winner's QLHS_... settings (a profile of it, 200 s). Later sessions:
# "product" and "sums" (each dot form alone, and the kernels alone at stage 1), "fma"
# (experiments 36-38: the two defaults of 2026-12-05 that every later row carries),
# "sweep" (experiments 24-25), "pool" (experiments 26, 32, 34, 35), "configs" and
# "host". A 15-minute device session has room for one ~500 s call, or two shorter ones
# (each fresh machine takes ~35 s to start; a warm one waits 30 s for the next).
# "block", "variants" and "op" are for later sessions (the machine stays warm between
# calls, but each is ~500 s).
# "step" (time limits add up to 560 s): benchmarks.stencil_times times the statistics,
#   pass 3's sums of "xla" and du = D^T dx alone, the XLA forms (the statistics and du
#   ran at 17 and 136 GB/s on the H100 in the "block" profile) against the Pallas
#   kernels of kernels.stencil at four tilings each, and picks QLHS_STATS_FORM,
#   QLHS_SUMS_FORM, QLHS_DU_FORM and QLHS_STENCIL_TILING for the rows after it:
#   fuse_d_bn="xla" (64.9 GB per step in the deviceless compile, ResNet50 98.2 GB; 2,074
#   img/s with the XLA forms) against ResNet50, with a profile of the Eq.(3) step;
#   "block" at every block (27.2 GB; 1,605 img/s), at the tiles block_tune chose in
#   experiment 11 unless QLHS_BLOCK_TILING is set; "pallas" (4,202 img/s at its old
#   tiling and du form); d_impl="shifted_t" with pin_hidden_layout (83.6 GB, never timed
#   on a GPU). (Bytes: benchmarks.aot, jax 0.11.2, --gemm triton.)
# "profile" (time limits add up to 560 s; NOTES.md experiment 22), the next session's
#   first call: where the default step's time goes on the device. Eq.(3)
#   fuse_d_bn="auto" (the default of configs/eq3.py) against ResNet50 on uint8 batches
#   (what training feeds), with the Eq.(3) step's HLO and a per-kernel profile (the last
#   profile, experiment 13's, is of an older step on an H100); Nsight Compute on pass
#   3's sums and du (ncu_kernel, below), which "ncu" could not reach on 2026-12-04, and
#   on the statistics, changed since; the three stencil kernels alone at stage 1 with
#   tiles that read whole rows of u; a second sample of QLHS_STENCIL_GRID=channels (+1.0%
#   in experiment 22, one sample).
# "stem" (time limits add up to 440 s; NOTES.md experiment 23): the stem convolution
#   computed on 2x2 blocks (stem_conv="space_to_depth": a 4x4 stride-1 convolution of 16
#   channels, where cuDNN ran the 7x7/2 one at 17 TFLOP/s) in both models, Eq.(3)
#   "auto" against ResNet50 on uint8 batches, the Eq.(3) step profiled; ResNet50 with
#   the direct stem convolution, the same call's baseline; then QLHS_PRODUCT_FORM=pallas
#   profiled (one step sample, -0.9% in experiment 22), for its kernels' times against
#   XLA's loop fusions of the first row (the product at 1.6 TB/s, pass 4 at 2.4 TB/s).
#   The two profiles' HLO share a name in hlo.tar: tar xf hlo.tar --occurrence=2 for
#   the second.
# "eq3" (200 s; for a device session's last minutes): the default Eq.(3) step alone on
#   uint8 batches, profiled kernel by kernel; its ratio is to the ResNet50 of an earlier
#   call (benchmarks/results.jsonl). First run for pass 3's sums without D u (NOTES.md
#   experiment 23; 103 s then). With the sweep's QLHS_... settings it profiles the
#   chosen step; with bwd among them each of its two compiles takes ~27 s longer
#   (experiment 30).
# "sweep" (time limits add up to 590 s; NOTES.md experiments 24, 25, 30 and 31): the
#   stencil kernels' tilings, and the walks down rows at stride 1 (QLHS_STENCIL_ROWS:
#   each row of u or dx loaded at its three horizontal shifts, not at nine taps; du ran
#   with L1 at 94% of its peak on the H200), in one call: the default step against
#   ResNet50 (also the second sample that "sums" wants); the statistics, du and the sums
#   alone at four tilings, tiles and walks, pass 4 with du as one walk (dx_du: dx never
#   stored) against the two kernels, the backward over the hidden tensors in one walk
#   (bwd, experiment 29) against the default's three kernels, and the forward product
#   (stencil_times, whose earlier sweeps timed one or two kernels per form: see
#   experiment 24); the step with the sweep's choice; the step with whichever of dx_du
#   and bwd the choice left out.
#   Each row against the first. With the time left, a second call profiles the chosen
#   step: QLHS_...=... (the sweep's "stencil_forms:" and "stencil_tiling:") BRING=$OUT
#   OUT=/tmp/qlhs_bench bash benchmarks/gpu_h100.sh eq3.
# "pool" (time limits add up to 390 s; NOTES.md experiments 26, 32, 34 and 35): the
#   stem's BatchNorm, ReLU and max-pool as one operation (stem_pool="argmax_bn", the
#   default of every ResNet-stem model since 2026-12-05: BatchNorm's backward sums on the
#   pooled grid, the pool's dense gradient never stored; 1.08 GB less a step for Eq.(3),
#   1.18 for ResNet50, in the deviceless compile), its taps read from the convolution's
#   output with a margin (since experiment 35) against the pool's -inf padding
#   (QLHS_STEM_TAPS=pad: bounds-checked scalar loads, 939 instructions a thread against
#   545), its dL/dy in one vectorised pass (since experiment 34) against the classes and
#   their stack (QLHS_STEM_GRAD=classes, experiment 26's form: a kernel of scalar
#   stores), and against the form before it all (stem_pool="argmax"), Eq.(3) "auto" on
#   uint8 batches, in one call. Both models have this stem: it moves the rate, and the
#   ratio only slightly. Then
#   benchmarks.erase_fill: the step's input
#   work alone (uint8 normalised, boxes erased, bfloat16 out) with each generator of the
#   erased boxes' fills, the counter hash (config.data.erase_noise="hash", the default
#   since 2026-12-05) and jax.random's threefry (before: ~130 integer operations a value
#   inside the stem's first kernel, 0.25 ms of an H200 step), interleaved; ~15 s.
# "fma" (time limits add up to 480 s; NOTES.md experiments 36-39): multiply-add
#   contraction in the kernels XLA compiles (qlhs_jax.xla_options; the default since
#   2026-12-05: XLA left each a * b + c a multiply and an add, and du's tiles issued 715
#   machine instructions a thread, 571 contracted), Eq.(3) "auto" against ResNet50 on
#   uint8 batches; then Eq.(3) with the forward product and pass 4 as Pallas kernels
#   (QLHS_PRODUCT_FORM=pallas, at experiment 39's tiles: no barrier, no branch, and no
#   padded copy of u in the step); then Eq.(3) with the XLA passes' taps padded inside
#   each fusion (QLHS_D_TAPS=pad, the form before experiment 37: each of eight taps a
#   2-byte load in a branch of its own, the forward product and pass 4 at 1.9x their
#   bounds on the H200; the default reads them from a padded copy of u, 1.96 GB more a
#   step); then both models with QLHS_XLA_FMA=0, in one call. The deviceless bounds
#   favour contraction for Eq.(3) (the sum of each kernel's larger bound 22.54 -> 22.06
#   ms; ResNet50's unchanged), the taps in the fusion over the copy (the copy's bytes),
#   and the Pallas kernels over both (no copy). The machine code's waits for loads
#   (experiment 39): a thread of the product and pass 4 waits 3 and 2 times on the copy
#   (40 and 28 warps an SM), 3 and 3 with the taps in the fusion, 4 and 7 as Pallas
#   kernels (64 warps an SM; at experiment 38's tiles 8 and 6, 48 and 32 warps). The
#   rows say which the device agrees with.
# "sums" (time limits add up to 555 s; NOTES.md experiments 23, 39, 40, 41 and 44): pass
#   3's sums, the statistics' lags and du as matrix products (QLHS_SUMS_FORM /
#   QLHS_STATS_FORM / QLHS_DU_FORM=pallas_dot: Triton pipelines the loads that feed
#   their dots, cp.async trips ahead, where the element-wise kernels wait for theirs;
#   du's products also take half the element-wise instructions; in experiment 23's
#   profile the three took 4.56, 2.0 and 2.9 ms a step, 3.1, 1.8 and 0.9 above their
#   bounds), in one call: Eq.(3) "auto" against ResNet50 on uint8 batches;
#   the three kernels alone at stage 1 in both forms (benchmarks.stencil_times, checked
#   against XLA's forms: a WRONG line means do not trust the rows after it); the step
#   with the sums and the lags as products, profiled kernel by kernel, then with the
#   sums alone as products, each against the first row (du's products, less likely to
#   win, alone only).
#   (Until 2026-12-06 this part timed the sums kernel as it was before 2026-12-04,
#   QLHS_SUMS_FORM=pallas_xhat, against the default: never run.)
# "product" (time limits add up to 560 s; NOTES.md experiments 23, 39, 42 and 43; run
#   it first): the forward product and pass 4 with D u as matrix products
#   (QLHS_PRODUCT_FORM=pallas_dot: per tap u's shifted rows times D's kernel in exact
#   bfloat16 parts, c and dp times the identity, so that Triton copies every operand
#   of a trip a trip ahead and a thread waits for none of them; in experiment 23's
#   profile XLA's fusions took 3.81 and 4.70 ms a step, 2.7x and 1.8x their copy time
#   at stage 1, latency-bound: 3 and 2 waits a thread), in one call: Eq.(3) "auto"
#   against ResNet50 on uint8 batches; the product alone at stage 1 as XLA's fusion and
#   as products, of three parts of the float32 kernel and of one part of the kernel
#   rounded to bfloat16 (QLHS_D_KERNEL=compute, at three tilings;
#   benchmarks.stencil_times, checked against XLA's form); the step with one part,
#   profiled kernel by kernel; then with pass 3's sums and the statistics' lags as
#   products too (QLHS_SUMS_FORM / QLHS_STATS_FORM=pallas_dot, experiments 40 and 44),
#   each against the first row. (Until experiment 43 it timed the element-wise kernel
#   and three tilings of three parts alone; until experiment 44 its last row was the
#   step with three parts: never run.)
# "c_kernels" (time limits add up to 420 s; NOTES.md experiments 47 and 48; after
#   "dot_forms"): first benchmarks.fused --weights --check-only, the values on the
#   device: the operation given C's and A's weights, with c, dp and the weight gradients
#   made in the dot forms' kernels ("dot_forms"' last row), against float64 autodiff of
#   the model's matmuls around the reference at every block shape (exit 1: do not trust
#   those rows; until 2026-12-07 no device check knew these forms). Then c = C u made
#   inside the dot forms' kernels and never stored (QLHS_C_FORM=kernels: the forward
#   product, pass 4 and pass 3's sums make each tile of c from u's centre tap and C's
#   columns; 8.5 GB a step less in the deviceless compile), Eq.(3) "auto" with every dot
#   form of "product"'s last row, with the stored c, with c made at stages 1-2 and at
#   stages 1-3 (kernels_wide: 2.3 GB less again, for ~6.5 GB more L2 reads), in one
#   call.
# "dot_forms" (time limits add up to 530 s; NOTES.md experiments 40-51; run it first):
#   the default step (Eq.(3) "auto") against ResNet50 on uint8 batches, the ratio and
#   the H100's rate that the goal names; then Eq.(3) with every dot form (the forward
#   product, pass 4, pass 3's sums and the statistics' lags as matrix products, D's
#   kernel in one bfloat16 part: "product"'s last row) with c and dp stored; with c made
#   in the kernels at stages 1-3 (experiment 47) and dp = dy A^T made in the backward's
#   kernels at stages 1-2 (QLHS_DP_FORM=kernels, experiment 48); then with C's and A's
#   gradients summed in pass 4, u's shares added in du's kernel and A applied in the
#   forward product's kernel too (QLHS_WEIGHT_GRADS=pass4, experiment 48;
#   QLHS_DU_SUM=kernel, experiment 50; QLHS_P_FORM=kernels, experiment 51: the configs'
#   ",dot_forms"), profiled kernel by kernel; each against the first row. Compile and
#   time only, no kernel alone: "product" and "sums" split the rows' differences by
#   kernel.
# "ablate" (time limits add up to 400 s; NOTES.md experiments 48-52): which of the
#   stack's last three pieces, never timed, pays (experiment 52's projection: the
#   weight gradients in pass 4 only if the Pallas kernels run under 1.86x their bounds): the configs' ",dot_forms" stack whole
#   (dot_forms' last row, without its profile), then with A applied by XLA's matmul
#   (QLHS_P_FORM=stored), with u's shares added by XLA (QLHS_DU_SUM=xla), and with C's
#   and A's gradients by XLA's matmuls (QLHS_WEIGHT_GRADS=xla, which needs p stored);
#   each against the first.
# "tiles" (time limits add up to 360 s; NOTES.md experiments 53-55): the configs'
#   ",dot_forms" stack (its taps copied through L1, QLHS_TAP_COPY=l1) at today's tiles,
#   then with pass 3's sums at 64 pixels and the product and pass 4 at 3 stages (the
#   tiles before the model counted shared memory: by it 1.62 ms a step more), then at
#   the tiles before the latency model (benchmarks.warp_cycles) chose the lags' 4
#   stages and pass 4's 4 warps (by the model 0.85 ms a step more), then with the
#   widest tap copies (16 bytes past L1 in pass 3's sums and the product with A: more
#   read from L2, for about the same latency model); each against the first.
# "ncu" (time limits add up to 300 s; NOTES.md experiments 13-17 and 22): what bounds
#   the stencil kernels, which ran at ~1.1 TB/s (the statistics at 0.2) on the H100 at
#   every tiling tried, with prefetching too: Nsight Compute (--clock-control none)
#   reads throughput, memory, occupancy, warp-stall and scheduler sections for the first
#   launch of each kernel at stage 1 (the statistics from lags, pass 3's sums and du, at
#   the default tiles; benchmarks.stencil_times runs them), one process each, into
#   $OUT/ncu.txt. Until 2026-12-04 this part also timed four steps (NOTES.md experiment
#   22: "auto" against ResNet50, ResNet50 with the old stem, QLHS_STENCIL_GRID=channels,
#   QLHS_PRODUCT_FORM=pallas).
# "block" (490 s), the "step" of experiment 11: benchmarks.block_tune (NOTES.md
#   experiment 9) times each of fuse_d_bn="block"'s three kernels alone at up to five
#   tiles per block shape (six at widths >= 256: 16 warps too; the sums kernel also at
#   wider slices of hidden channels), the fastest becoming QLHS_BLOCK_TILING, and the
#   hidden path against "xla" per shape, which gives block_max_width (blocks wider than
#   it take "xla"); then Eq.(3) with fuse_d_bn="block" against ResNet50, profiled;
#   benchmarks.block_check then compares the kernels at that tiling with float64 on the
#   device (exit 1: do not trust the row).
# "op" (time limits add up to 380 s): the BN(D u)*c operation alone
#   (benchmarks.fused): agreement with the float64 reference, forward+backward of
#   none/xla/pallas with the default tiling and every pass alone (--passes; du in both
#   QLHS_DU_FORM forms), then the Pallas kernels alone with three other tilings (all
#   channels of a pixel in one tile, the columns split; 8 warps).
# "variants" (550 s): fuse_d_bn="block" at block_max_width 0 (every block) and 64,
#   at QLHS_BLOCK_TILING (after "block" in the same call: the tuned tiles); ResNet50 with
#   JAX's own max-pool gradient (stem_pool="autodiff", 102.1 GB: what the stem's argmax
#   pool gives both models); Eq.(3) with d_impl="shifted_t" and pin_hidden_layout (83.6
#   GB); the s-major layout; MobileNetV3; the plain Eq.(3) (101.4 GB; 4,489 img/s on an
#   H100 before). (Measured before, so left out: d_impl="grouped", 0.59x on the H200;
#   remat="dots", 0.88x. Dropped for time: s-major with shifted_t + pinned, and the
#   pinned layout alone.)
# "configs" (time limits add up to 510 s; NOTES.md experiment 15): first Eq.(3) "auto"
#   against ResNet50 with QLHS_BN_STATS=two, BatchNorm's statistics from two reductions
#   as before 2026-12-03 (the rows of "ncu" have the new default, one reduction: 0.97 and
#   4.57 GB less per step in the deviceless compile); then configs/eq5.py and
#   configs/eq3w.py, which set fuse_d_bn="auto" since 2026-12-03 on their deviceless
#   bytes alone (0.73x and 0.72x the plain path's): each with "auto" and with the plain
#   path, to confirm the default or take it back.
# "input" (390 s; README "Data", device_normalize): Eq.(3) "auto" against ResNet50 with
#   --input uint8, the batches training feeds since 2026-12-04 (uint8 images normalised
#   and randomly erased inside the step; both models pay the same). Against the first
#   row of "ncu" (float32 images): what moving that work off the host costs the GPU.
#   Then Eq.(3) with --input uint8_randaugment (config.data.device_randaugment, off by
#   default): what RandAugment in the step costs, against the row before; and Eq.(3)
#   with --input uint8_threefry: the fills from jax.random as before 2026-12-05
#   (NOTES.md experiment 32), against the first row; and Eq.(3) with --state-writes
#   per_leaf: the new state written leaf by leaf, the old donated, as before 2026-12-05
#   (config.group_state_writes=False; NOTES.md experiment 33: 664 kernels, not 599),
#   against the first row.
# "host" (~200 s; README "Host throughput"; not part of "all"): the GPU machine's own 16
#   cores, where the README's 16-core rows come from (float32 batches, 2026-11-27), now
#   also with uint8 batches (device_normalize) and with device_randaugment:
#   benchmarks.input --seconds 3 --workers 0,16, into $OUT/input.json. The machine has
#   no grain or ml-collections: first, here, bash benchmarks/gpu_wheels.sh (into .whl/),
#   and carry ".whl"; this part installs them into /tmp/site.
# Records go to $OUT/results.jsonl (append them to benchmarks/results.jsonl), compiled
# HLO to $OUT/hlo.tar, everything printed to $OUT/log.txt. "step" and "block" also
# profile their first row's Eq.(3) step (3 traced steps of a second compile without XLA's command
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
# --tilings 16,4 --calls 1 --repeats 1" STENCIL_ARGS="--size-scale 8 --calls 1 --repeats 1
# --shapes stage1,stage2_block0" bash benchmarks/gpu_h100.sh all
# (~14 minutes on 2 cores). In seconds, tests/benchmarks/test_gpu_h100_script.py checks
# every flag it passes against its module's parser and builds every model and override it
# times, so a renamed flag or model field fails on the CPU, not in the GPU session.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qlhs_bench}
PART=${1:-step}
case "$PART" in op|step|profile|stem|eq3|sweep|pool|fma|sums|product|c_kernels|dot_forms|ablate|tiles|ncu|block|variants|configs|input|host|all) ;; *) echo "usage: $0 [op|step|profile|stem|eq3|sweep|pool|fma|sums|product|c_kernels|dot_forms|ablate|tiles|ncu|block|variants|configs|input|host|all]" >&2; exit 2;; esac
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
    for f in log.txt results.jsonl kernels.jsonl gpu.txt hlo.tar ncu.txt input.json; do
      [ -f "$OUT/$f" ] && cp "$OUT/$f" "$BRING/"
    done
  fi
  return 0
}
settings() {  # the QLHS_... settings of this call, for the log
  echo "${QLHS_PALLAS_TILING:+(tiling $QLHS_PALLAS_TILING)}${QLHS_BLOCK_TILING:+(block tiling $QLHS_BLOCK_TILING)}${QLHS_STATS_FORM:+(stats $QLHS_STATS_FORM)}${QLHS_SUMS_FORM:+(sums $QLHS_SUMS_FORM)}${QLHS_DU_FORM:+(du $QLHS_DU_FORM)}${QLHS_PRODUCT_FORM:+(product $QLHS_PRODUCT_FORM)}${QLHS_BN_STATS:+(bn stats $QLHS_BN_STATS)}${QLHS_STEM_GRAD:+(stem grad $QLHS_STEM_GRAD)}${QLHS_STEM_TAPS:+(stem taps $QLHS_STEM_TAPS)}${QLHS_STENCIL_TILING:+(stencil $QLHS_STENCIL_TILING)}${QLHS_STENCIL_GRID:+(grid $QLHS_STENCIL_GRID)}${QLHS_STENCIL_ROWS:+(rows $QLHS_STENCIL_ROWS)}${QLHS_XLA_FMA:+(xla fma $QLHS_XLA_FMA)}${QLHS_D_TAPS:+(d taps $QLHS_D_TAPS)}${QLHS_D_KERNEL:+(d kernel $QLHS_D_KERNEL)}${QLHS_C_FORM:+(c $QLHS_C_FORM)}${QLHS_DP_FORM:+(dp $QLHS_DP_FORM)}${QLHS_WEIGHT_GRADS:+(weight grads $QLHS_WEIGHT_GRADS)}${QLHS_DU_SUM:+(du sum $QLHS_DU_SUM)}${QLHS_P_FORM:+(p $QLHS_P_FORM)}"
}
bench() {  # bench SECONDS ARGS...: one harness call under a time limit
  local limit=$1; shift
  echo "== $* $(settings)" | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.step --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" --steps "${STEPS:-20}" --warmup 3 --record "$R" "$@" 2>&1 \
    | quiet | tee -a "$OUT/log.txt" \
    | grep -E "^(model|ratio|timed) |^[a-z][a-z0-9_]+ +[a-z]+:|stopped|failed|rror|Killed" \
    | tail -n 10
  bring
}
fused_op() {  # fused_op SECONDS ARGS...: the operation alone (exit 1 = disagreement)
  local limit=$1; shift
  echo "== benchmarks.fused $* $(settings)" | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m qlhs_jax.benchmarks.fused --batch "${BATCH:-256}" \
    --record "$R" ${FUSED_ARGS:-} "$@" 2>&1 | quiet | tee -a "$OUT/log.txt" \
    | tail -n "${TAIL:-20}"
  echo "exit ${PIPESTATUS[0]}"
  bring
}
use_stencil_choice() {  # use_stencil_choice FALLBACK: export the forms and tiling of the
  # last "stencil_forms:" and "stencil_tiling:" lines of $OUT/stencil.txt (the forms
  # FALLBACK where none was printed)
  local forms spec
  forms=$(sed -n 's/^stencil_forms: //p' "$OUT/stencil.txt" | tail -n 1)
  forms=${forms:-$1}
  spec=$(sed -n 's/^stencil_tiling: //p' "$OUT/stencil.txt" | tail -n 1)
  export $forms
  if [ -n "$spec" ]; then export QLHS_STENCIL_TILING="$spec"; fi
  echo "$forms QLHS_STENCIL_TILING=${QLHS_STENCIL_TILING:-(default)}" | tee -a "$OUT/log.txt"
}
if [ "$PART" = op ] || [ "$PART" = all ]; then
  TAIL=80 fused_op 200 --passes
  for t in 4,4096,4,16 4,8192,8,32 4,2048,4,8; do
    TAIL=10 QLHS_PALLAS_TILING=$t fused_op 60 --impls pallas
  done
  echo "best tiling: $(python3 -m qlhs_jax.benchmarks.fused --best-of "$R")"
fi
# The tiles block_tune chose for "block" at stages 1-2 on the H100 (2026-11-27, NOTES.md
# experiment 11), for its rows where block_tune has not run in this call.
RUN1_BLOCK_TILING="dx@28x28x128x128s1=64,4 dx@56x56x64x64s1=64,4 forward@28x28x128x128s1=64,4 forward@56x56x64x64s1=64,4 sums@28x28x128x128s1=32,4,32 sums@56x56x64x64s1=32,4,64"
if [ "$PART" = step ] || [ "$PART" = all ]; then
  # The statistics, pass 3's sums and du = D^T dx alone, XLA's forms against the Pallas
  # kernels of kernels.stencil (NOTES.md experiment 12: on the H100 the XLA statistics
  # and du ran at 17 and 136 GB/s). Its last "stencil_forms:" and "stencil_tiling:"
  # lines (complete after every shape) set QLHS_STATS_FORM, QLHS_SUMS_FORM, QLHS_DU_FORM
  # and QLHS_STENCIL_TILING for the rows below.
  echo "== benchmarks.stencil_times" | tee -a "$OUT/log.txt"
  # (--kernels: the three it was written for; dx_du, bwd and the product, added since,
  # are the sweep's, and would take this row's time in compiles: NOTES.md experiment 30)
  timeout 120 python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" \
    --kernels stats,sums,du --budget 85 --record "$R" ${STENCIL_ARGS:-} 2>&1 | quiet \
    | tee -a "$OUT/log.txt" > "$OUT/stencil.txt"
  echo "exit ${PIPESTATUS[0]}"
  grep -E "^[a-z0-9_]+ \(|network so far|WRONG|failed|^stencil_|rror" "$OUT/stencil.txt" \
    | cut -c1-150
  # No choice printed (the run failed before its first shape ended): the XLA forms,
  # named (unset, each is "auto": the kernels), so that kernels never run on the device
  # cannot fail every row below.
  use_stencil_choice "QLHS_STATS_FORM=xla QLHS_SUMS_FORM=xla QLHS_DU_FORM=gather"
  export QLHS_BLOCK_TILING="${QLHS_BLOCK_TILING:-$RUN1_BLOCK_TILING}"
  bring
  # "xla" (64.9 GB a step, the fewest bytes; 2,074 img/s with the XLA forms) against
  # ResNet50, profiled without command buffers: what is slow once the two are fixed.
  bench 200 --model eq3_softball_ds --set 'fuse_d_bn="xla"' --vs resnet50 --hlo-dir "$H" \
    --profile-dir "$OUT"
  # "block" at every block (1,605 img/s before), at run 1's tiles.
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="block"' --set block_max_width=0
  # "pallas" (4,202 img/s at the old tiling 4,2048,4 and the old du form; its operation
  # alone is 12 ms faster at 4,8192,4, the default since).
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="pallas"'
  # The plain path with the hand-written transpose and the pinned layout (83.6 GB; never
  # timed on a GPU), du from QLHS_DU_FORM.
  bench 80 --model eq3_softball_ds --set 'd_impl="shifted_t"' --set pin_hidden_layout=true
fi
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
# MemoryWorkloadAnalysis_Tables: sectors and wavefronts per L1 request, for the question
# experiment 22 left (L1 at 76% of its throughput, DRAM at 10%: requests or bytes?).
NCU_SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis
  --section MemoryWorkloadAnalysis_Tables --section Occupancy --section LaunchStats
  --section WarpStateStats --section SchedulerStats"
ncu_kernel() {  # ncu_kernel SECONDS NAME KERNEL [FORM]: Nsight Compute on the first
  # launch of the kernel named NAME (stencil.NAMES, which is also its name in a launch)
  # at stage 1, stencil_times running only KERNEL (stats, sums or du) in its XLA forms
  # and the Pallas FORM (default pallas, the tiles; pallas_rows: the walk), appended to
  # $OUT/ncu.txt.
  # ncu saves the device memory before a kernel's ~18 replays and restores it between
  # them. On 2026-12-04, with JAX holding ~75% of the device (its
  # default preallocation), it warned "Backing up device memory in system memory. Kernel
  # replay might be slow", and 150 s covered two launches. Without the preallocation
  # JAX holds only what the shape's arrays need.
  local limit=$1 name=$2 kernel=$3 form=${4:-pallas}
  echo "== ncu ($NCU): $name ($form) at stage 1" | tee -a "$OUT/log.txt" "$OUT/ncu.txt"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$limit" "$NCU" --clock-control none \
    --kernel-name regex:"^$name" --launch-count 1 $NCU_SECTIONS \
    python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" --shapes stage1 \
      --calls 1 --repeats 1 --stats-tilings 16,16,4,1 --sums-tilings 32,8,4 \
      --du-tilings 32,16,4 --kernels "$kernel" --forms "$form" ${STENCIL_ARGS:-} 2>&1 \
      | quiet > "$OUT/ncu1.txt"
  echo "exit ${PIPESTATUS[0]}" >> "$OUT/ncu1.txt"
  cat "$OUT/ncu1.txt" >> "$OUT/ncu.txt"
  grep -E "^  [a-z_]+.*\(|Memory Throughput|DRAM Throughput|L1/TEX Cache|Achieved Occupancy|Registers Per|Stall|One or More Eligible|No Eligible|Duration|xcessive|oalesc|^exit" \
    "$OUT/ncu1.txt" | head -n 40
  rm -f "$OUT/ncu1.txt"
  bring
}
if [ "$PART" = profile ]; then
  # The default step against ResNet50, profiled, on the uint8 batches that training
  # feeds: 7,070 against 6,956 img/s on the H200 on 2026-12-04 (36.2 ms a step, where
  # 1.2x ResNet50 needs 30.7). The profile also shows what the input kernel, 0.6 ms
  # more than with float32 batches, spends its time on.
  bench 200 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8 \
    --hlo-dir "$H" --profile-dir "$OUT"
  ncu_kernel 70 qlhs_bn_sums sums
  ncu_kernel 70 qlhs_d_transpose du
  # The statistics since experiment 22 (282 us then, at 96 registers and 5 programs per
  # SM): each side of the border summed in pieces of m positions, 56 registers by ptxas.
  ncu_kernel 70 qlhs_lag_sums stats
  # Requests or bytes? Per tap, the default tiles read 16-32 B of each 128 B row of u
  # (stage 1: 64 channels; du 128 B of each 512 B row of dx); these read whole rows
  # (ptxas: 108-114, 168-218 and 114-157 registers, no spills). Alone, so a hint only: a
  # tile must be confirmed in the step.
  echo "== benchmarks.stencil_times: stage 1, whole rows" | tee -a "$OUT/log.txt"
  timeout 70 python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" \
    --shapes stage1 --kernels stats,sums,du --forms pallas --calls 10 --repeats 3 \
    --stats-tilings 16,16,4,1 8,64,4,1 4,64,4,1 \
    --sums-tilings 32,8,4 8,32,4 4,64,4 --du-tilings 32,16,4 8,64,4 4,64,4 \
    --record "$R" ${STENCIL_ARGS:-} 2>&1 | quiet | tee -a "$OUT/log.txt" \
    | grep -E "^  (stats|sums|du) |rror"
  bring
  # The grid's channel blocks fastest: +1.0% in experiment 22 (float32 batches), one
  # sample; the default stays "pixels" until a second one agrees. Against the first row.
  QLHS_STENCIL_GRID=channels bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
fi
if [ "$PART" = stem ]; then
  # Experiment 23's profile: the stem's convolution 1.74 ms and its kernel's gradient 1.10
  # ms of the 35.8 ms step (ResNet50 has the same stem).
  bench 200 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --set 'stem_conv="space_to_depth"' --vs resnet50 --vs-set 'stem_conv="space_to_depth"' \
    --input uint8 --hlo-dir "$H" --profile-dir "$OUT"
  bench 90 --model resnet50 --input uint8
  QLHS_PRODUCT_FORM=pallas bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --set 'stem_conv="space_to_depth"' --input uint8 --hlo-dir "$H" --profile-dir "$OUT"
fi
if [ "$PART" = eq3 ]; then
  bench 200 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8 --hlo-dir "$H" \
    --profile-dir "$OUT"
fi
if [ "$PART" = sweep ]; then
  # The default step against ResNet50 (also the second sample of the sums kernel that
  # "sums" wants).
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  # The statistics, du and pass 3's sums alone at stages 1-2, each at four tilings as
  # tiles ("pallas"), walks loading a step ahead ("pallas_rows", QLHS_STENCIL_ROWS) and
  # walks loading where used ("pallas_rows_now"). The first sweep in which every tiling
  # is its own kernel (experiment 24: until then jax.jit reused an earlier tiling's
  # trace, so the sweeps of experiments 13, 22 and 23 timed one or two kernels per
  # form). ptxas at stage 1 (benchmarks.triton_compile --op stencil): du's walk issues
  # in 0.172 ms against the tiles' 0.237 (0.162 loading where used), the statistics'
  # in 0.147 against 0.134; registers, tiles / walk: du 136 / 128 at 32,16,4, 114 / 71
  # at 32,8,4; the sums 114 / 143 at 32,8,4, 70 / 74 at 16,8,4; the statistics 56 / 80.
  # dx_du (experiment 25): pass 4 and du as one walk, dx never stored, against XLA's
  # pass 4 then du's tiles (the default step's two kernels); ptxas at stage 1: 0.378 ms
  # against 0.233 + 0.237, 191 registers at 32,8,4 (64 lanes by 4 channels there), 95
  # at 32,4,4 (0.476 ms), 104 at 32,8,8 (0.456), 191 at 32,4,2 (2 warps). Its entries
  # check it against XLA's pass 4 and du: a race on dx's rows (the barrier, the two
  # rows) would show as WRONG.
  # bwd (experiment 29): pass 3's sums, dc and du's share from g in one walk (c and dp
  # read once for the whole backward), then du's share from u (a 5x5 stencil), against
  # the default step's three kernels; ptxas at stage 1: 0.532 + 0.120 ms against 0.180 +
  # (pass 4) + 0.237, 147 registers at 32,4,4, 255 at 32,8,4 (0.474 ms). Checked against
  # XLA's forms on the device like dx_du.
  # The forward product as XLA's fusion, tiles and walks (QLHS_PRODUCT_FORM; the tiles
  # ran as fast as XLA's fusion in experiment 23's step, at 32,16,4, where each tap went
  # through shared memory behind a barrier; 16,32,8 (experiment 38) has none, and 16,16,8,
  # the default since experiment 39, waits for its loads half as often; the walk loads
  # u's rows at three shifts). du at 16,8,4 waits 4 times, at its default 8.
  # Stops starting shapes after 120 s (stage 1 alone is ~66 entries). Compiling them is
  # most of the time: deviceless on 2 CPU cores (--compile-only h100, experiment 31),
  # ~63 s at stage 1 and ~56 s at stage 2 (88 and 73 s before du_bn was compiled once
  # a shape and form: 12-15 s a compile, its unrolled loop; bwd's walk takes ~1 s).
  echo "== benchmarks.stencil_times: tilings and walks" | tee -a "$OUT/log.txt"
  timeout 220 python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" \
    --shapes stage1,stage2 --forms pallas,pallas_rows,pallas_rows_now --budget 120 \
    --calls 10 --repeats 3 --stats-tilings 16,16,4,1 32,8,4,1 16,8,4,1 32,16,4,1 \
    --du-tilings 32,16,4 16,8,4 64,8,4 64,16,8 \
    --sums-tilings 32,8,4 16,8,4 32,4,4 16,16,4 \
    --dx-du-tilings 32,8,4 32,4,4 32,8,8 32,4,2 --bwd-tilings 32,4,4 32,8,4 \
    --product-tilings 16,16,8 16,32,8 32,16,4 \
    --record "$R" ${STENCIL_ARGS:-} 2>&1 \
    | quiet | tee -a "$OUT/log.txt" > "$OUT/stencil.txt"
  echo "exit ${PIPESTATUS[0]}"
  grep -E "^[a-z0-9_]+ \(|network so far|WRONG|failed|^stencil_|rror" "$OUT/stencil.txt" \
    | cut -c1-150
  bring
  # The step with the sweep's choice (in a subshell: the rows after it keep the
  # defaults); against the first row. A step with bwd compiles ~27 s longer (its walk and
  # du_bn at four shapes; deviceless on 2 cores: 54 s against 27-36 s for the default step).
  (use_stencil_choice "QLHS_STATS_FORM=pallas QLHS_SUMS_FORM=pallas QLHS_DU_FORM=pallas"
   bench 115 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8)
  # The one of dx_du and bwd that the choice left out, alone at its default tiles: the
  # default step but for pass 4 and du (dx_du: 0.82 GB less a stage-1 block) or but for
  # the whole backward over the hidden tensors (bwd: 1.2 GB less), against the first row.
  # (the last "stencil_forms:" line, as use_stencil_choice reads it)
  if sed -n 's/^stencil_forms: //p' "$OUT/stencil.txt" | tail -n 1 \
      | grep -q "QLHS_STENCIL_ROWS=.*bwd"; then
    QLHS_STENCIL_ROWS=dx_du bench 105 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
      --input uint8
  else
    QLHS_STENCIL_ROWS=bwd bench 105 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
      --input uint8
  fi
fi
if [ "$PART" = pool ]; then
  bench 100 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8
  # The pool's taps from its -inf padding, as before experiment 35 (the same values).
  QLHS_STEM_TAPS=pad bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
  # The stem's dL/dy as experiment 26 wrote it (the classes and a stack), against the row
  # above (one vectorised pass since experiment 34; the same values).
  QLHS_STEM_GRAD=classes bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
  bench 90 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --set 'stem_pool="argmax"' \
    --input uint8
  echo "== benchmarks.erase_fill" | tee -a "$OUT/log.txt"
  timeout 40 python3 -m qlhs_jax.benchmarks.erase_fill --batch "${BATCH:-256}" \
    --size "${SIZE:-224}" 2>&1 | quiet | tee -a "$OUT/log.txt" | tail -n 3
  bring
fi
if [ "$PART" = fma ]; then
  # Both models with multiply-add contraction (the default since 2026-12-05), then both
  # without it (XLA's own: each a * b + c a multiply and an add), each row a ratio.
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  # The forward product and pass 4 as Pallas kernels (stencil.product and dx_dc, the same
  # values), against the first row: at their tiles since experiment 39 (16 pixels by 16
  # channels, 8 warps) their PTX has no barrier and no branch, a thread waits for its
  # loads 4 and 7 times at 64 warps an SM, and with them no XLA pass reads u's taps, so
  # the step writes no padded copy (1.96 GB less). Experiment 23 timed them at 32,16,4,
  # where each tap went through shared memory behind a barrier.
  QLHS_PRODUCT_FORM=pallas bench 90 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
  # The XLA passes' taps from a pad inside each fusion, as before experiment 37 (the
  # same values), against the first row: each of eight taps a bounds-checked load in a
  # branch of its own (the default since 2026-12-05 reads them from a padded copy of u).
  QLHS_D_TAPS=pad bench 90 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
  QLHS_XLA_FMA=0 bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --vs resnet50 --input uint8
fi
if [ "$PART" = sums ]; then
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  # The three kernels alone at stage 1, each form at its default tiles and the sums' dots
  # at 32 pixels too, whose copies go through L1 (compiles: ~70 s on 2 CPU cores, the
  # lags' dots ~23 s, du's ~13 s each). du's dots read their 9 taps of the hidden dx
  # past L1, from L2, pipelined (3 stages, the default), or through L1, not ahead and
  # waiting 9 times a trip (1 stage; NOTES.md experiment 41): against the element-wise
  # du (through L1, 8 waits). At 64 pixels each tap's product (wgmma) is waited for
  # before the next; at 32 they are mma.sync, none waited for, for more instructions
  # (issue floors 0.123 and 0.207 ms; experiment 44).
  echo "== benchmarks.stencil_times: the dot forms" | tee -a "$OUT/log.txt"
  timeout 145 python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" \
    --shapes stage1 --kernels stats,sums,du --forms pallas,pallas_dot --calls 10 \
    --repeats 3 --stats-tilings 16,16,4,1 --sums-tilings 32,8,4 --du-tilings 32,16,4 \
    --sums-dot-tilings 64,16,4,3 32,16,4,3 --stats-dot-tilings 32,16,4,4 \
    --du-dot-tilings 64,8,4,3 64,8,4,1 32,8,4,3 --record "$R" ${STENCIL_ARGS:-} 2>&1 \
    | quiet \
    | tee -a "$OUT/log.txt" \
    | grep -E "^[a-z0-9_]+ \(|  (stats|sums|du) |network so far|WRONG|failed|rror" \
    | cut -c1-150
  echo "exit ${PIPESTATUS[0]}"
  bring
  # Both as products, profiled kernel by kernel (each dot kernel's time in the step,
  # against its bound: xla_floors --measured on this HLO), then the sums alone (the
  # difference is the lags'), each against the first row.
  QLHS_SUMS_FORM=pallas_dot QLHS_STATS_FORM=pallas_dot bench 170 --model eq3_softball_ds \
    --set 'fuse_d_bn="auto"' --input uint8 --hlo-dir "$H" --profile-dir "$OUT"
  QLHS_SUMS_FORM=pallas_dot bench 90 --model eq3_softball_ds --set 'fuse_d_bn="auto"' \
    --input uint8
fi
if [ "$PART" = product ]; then
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  # The product alone at stage 1: XLA's fusion (the default) and the products with D's
  # float32 kernel in three parts at their default tiles (47 KB of shared memory, 4
  # programs an SM); then with the kernel in bfloat16, one part (QLHS_D_KERNEL=compute),
  # at 32 pixels by 16 channels with 3 and 2 stages and at 64 pixels (54, 41 and 86 KB:
  # 4, 5 and 2 programs an SM; experiment 43).
  for d_kernel in float32 compute; do
    echo "== benchmarks.stencil_times: the product as products, D's kernel $d_kernel" \
      | tee -a "$OUT/log.txt"
    tilings=""  # three parts: the default alone; one part: its three (stencil_times')
    [ "$d_kernel" = float32 ] && tilings="--product-dot-tilings 64,4,4,2"
    timeout 70 python3 -m qlhs_jax.benchmarks.stencil_times --batch "${BATCH:-256}" \
      --shapes stage1 --kernels product --forms pallas_dot --calls 10 --repeats 3 \
      --d-kernel "$d_kernel" $tilings --record "$R" ${STENCIL_ARGS:-} 2>&1 \
      | quiet | tee -a "$OUT/log.txt" \
      | grep -E "^[a-z0-9_]+ \(|  product |network so far|WRONG|failed|rror" | cut -c1-150
    echo "exit ${PIPESTATUS[0]}"
    bring
  done
  # The step with the forward product and pass 4 as products of one part of D's kernel
  # rounded to bfloat16, profiled (each kernel's time against its bound: xla_floors
  # --measured on this HLO); then with pass 3's sums and the statistics' lags as
  # products too (experiments 40 and 44): the difference is theirs. (Until experiment
  # 44 the last row was the product with three parts, which the rows alone compare.)
  QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute bench 170 --model eq3_softball_ds \
    --set 'fuse_d_bn="auto"' --input uint8 --hlo-dir "$H" --profile-dir "$OUT"
  QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
    QLHS_STATS_FORM=pallas_dot bench 100 --model eq3_softball_ds \
    --set 'fuse_d_bn="auto"' --input uint8
fi
if [ "$PART" = c_kernels ]; then
  # First the values, on the device: the operation given C's and A's weights, with c,
  # dp and the weight gradients made in the dot forms' kernels, u's shares added in
  # du's and A applied in the product's (dot_forms' last row), against float64 at every
  # block shape (exit 1: do not trust those rows). Then every dot form with D's kernel
  # in one bfloat16 part (product's last row), then the same with c made in their
  # kernels: the difference is c's write and three reads against
  # one more product a tile in three kernels and u's centre tap read from L2 once per
  # channel block (experiment 47); then with stage 3 making c too.
  QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
    QLHS_STATS_FORM=pallas_dot QLHS_C_FORM=kernels_wide QLHS_DP_FORM=kernels \
    QLHS_WEIGHT_GRADS=pass4 QLHS_DU_SUM=kernel QLHS_P_FORM=kernels QLHS_TAP_COPY=l1 \
    fused_op 120 --weights --check-only
  for c_form in stored kernels kernels_wide; do
    QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
      QLHS_STATS_FORM=pallas_dot QLHS_C_FORM=$c_form bench 100 --model eq3_softball_ds \
      --set 'fuse_d_bn="auto"' --input uint8
  done
fi
if [ "$PART" = dot_forms ]; then
  # The goal's two numbers first (a session cut off keeps them), then the opt-in dot
  # forms stacked, every tap copied through L1 (experiment 54) in each row (c,dp,
  # weight grads,du sum,p): all stored; c made at stages 1-3 and dp
  # at stages 1-2; and C's and A's gradients summed in pass 4, u's shares added in
  # du's kernel and p never stored too (the configs' ",dot_forms"; profiled: each
  # kernel's time against its bound, xla_floors --measured on this HLO). "c_kernels"
  # has c made alone.
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  for forms in stored,stored,xla,xla,stored kernels_wide,kernels,xla,xla,stored \
      kernels_wide,kernels,pass4,kernel,kernels; do
    limit=100
    profile=()
    if [ "$forms" = kernels_wide,kernels,pass4,kernel,kernels ]; then
      limit=180
      profile=(--hlo-dir "$H" --profile-dir "$OUT")
    fi
    IFS=, read -r c_form dp_form grads du_sum p_form <<< "$forms"
    QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
      QLHS_STATS_FORM=pallas_dot QLHS_C_FORM=$c_form QLHS_DP_FORM=$dp_form \
      QLHS_WEIGHT_GRADS=$grads QLHS_DU_SUM=$du_sum QLHS_P_FORM=$p_form QLHS_TAP_COPY=l1 \
      bench "$limit" --model eq3_softball_ds \
      --set 'fuse_d_bn="auto"' --input uint8 "${profile[@]}"
  done
fi
if [ "$PART" = ablate ]; then
  # The stack whole, then without one piece a row (weight grads,du sum,p).
  for forms in pass4,kernel,kernels pass4,kernel,stored pass4,xla,kernels \
      xla,kernel,stored; do
    IFS=, read -r grads du_sum p_form <<< "$forms"
    QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
      QLHS_STATS_FORM=pallas_dot QLHS_C_FORM=kernels_wide QLHS_DP_FORM=kernels \
      QLHS_WEIGHT_GRADS=$grads QLHS_DU_SUM=$du_sum QLHS_P_FORM=$p_form QLHS_TAP_COPY=l1 \
      bench 100 --model eq3_softball_ds \
      --set 'fuse_d_bn="auto"' --input uint8
  done
fi
if [ "$PART" = tiles ]; then
  # The stack at today's tiles (pass 3's sums at 32 pixels, the product and pass 4 at
  # 2 stages, the lags at 4 stages, pass 4 with the gradients at 4 warps) with its taps
  # copied through L1, at experiment 54's tiles, at experiment 52's, then with the
  # widest tap copies (16 bytes past L1 in pass 3's sums and the product with A).
  for row in "l1:" "l1:sums_dot=64,16,4,3 product_dot=32,16,4,3" \
      "l1:stats_dot=32,16,4,3 grads_dot=32,16,8,3" "widest:"; do
    IFS=: read -r taps spec <<< "$row"
    QLHS_PRODUCT_FORM=pallas_dot QLHS_D_KERNEL=compute QLHS_SUMS_FORM=pallas_dot \
      QLHS_STATS_FORM=pallas_dot QLHS_C_FORM=kernels_wide QLHS_DP_FORM=kernels \
      QLHS_WEIGHT_GRADS=pass4 QLHS_DU_SUM=kernel QLHS_P_FORM=kernels QLHS_TAP_COPY=$taps \
      QLHS_STENCIL_TILING="$spec" bench 90 \
      --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8
  done
fi
if [ "$PART" = ncu ]; then
  # Experiment 22 read the statistics (qlhs_lag_sums): L1-bound (76% of L1/TEX's
  # throughput, 10.5% of DRAM's), 96 registers a thread (31% occupancy at most).
  ncu_kernel 100 qlhs_lag_sums stats
  ncu_kernel 100 qlhs_bn_sums sums
  ncu_kernel 100 qlhs_d_transpose du
fi
if [ "$PART" = block ] || [ "$PART" = all ]; then
  # The "step" of 2026-11-27 (NOTES.md experiment 11), for "block" alone: its tiles, the
  # row with a profile, the check against float64.
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
  # "block" against ResNet50, with a profile (compiled without command buffers, so that
  # the backward kernels are seen one by one).
  bench 230 --model eq3_softball_ds --set 'fuse_d_bn="block"' --set "block_max_width=$width" \
    --vs resnet50 --hlo-dir "$H" --profile-dir "$OUT"
  # After the timing, so that it cannot crowd it out (50 s covered stage 1 alone): the
  # kernels at these tiles against float64 on the device (exit 1: do not trust the row).
  echo "== benchmarks.block_check" | tee -a "$OUT/log.txt"
  timeout 90 python3 -m qlhs_jax.benchmarks.block_check --batch "${CHECK_BATCH:-4}" 2>&1 \
    | quiet | tee -a "$OUT/log.txt" | grep -E "WRONG|agree|DISAGREE|rror" | tail -n 6
  echo "exit ${PIPESTATUS[0]}"
  bring
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
if [ "$PART" = configs ] || [ "$PART" = all ]; then
  QLHS_BN_STATS=two bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50
  bench 100 --model eq5_softball_ds --set 'fuse_d_bn="auto"'
  bench 80 --model eq5_softball_ds
  bench 100 --model eq3w_softball_ds --set 'fuse_d_bn="auto"'
  bench 80 --model eq3w_softball_ds
fi
if [ "$PART" = input ] || [ "$PART" = all ]; then
  bench 150 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --vs resnet50 --input uint8
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8_randaugment
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8_threefry
  bench 80 --model eq3_softball_ds --set 'fuse_d_bn="auto"' --input uint8 \
    --state-writes per_leaf
fi
if [ "$PART" = host ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  if ! python3 -c "import grain, ml_collections" 2>/dev/null; then
    echo "gpu_h100.sh host: grain or ml-collections is missing here; run bash" \
      "benchmarks/gpu_wheels.sh where pip works and carry .whl" | tee -a "$OUT/log.txt" >&2
    exit 2
  fi
  echo "== benchmarks.input on $(nproc) cores" | tee -a "$OUT/log.txt"
  timeout 400 python3 -m qlhs_jax.benchmarks.input --seconds 3 --workers 0,16 \
    --json "$OUT/input.json" 2>&1 | quiet | tee -a "$OUT/log.txt" | tail -n 40
  bring
fi
echo "== table"
python3 -m qlhs_jax.benchmarks.table "$R" | tee -a "$OUT/log.txt"
bring
