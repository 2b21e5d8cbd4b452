#!/usr/bin/env bash
# The symmetry measurements of README "Symmetry": train the quickstart Eq.(3) and the
# GL-closed Eq.(3)w (embedded digits, 2-core CPU: ~3-6 minutes each), then on each run
# check the group, sparsify with the whole group and with its diagonal part only, and
# (literal Eq.(3)) search for weak symmetries (~10 minutes). About 25-30 minutes on a
# 2-core CPU.
#   OUT=/tmp/qlhs_symmetry bash benchmarks/symmetry_quickstart.sh
# Tables, JSON and plots land in each run's workdir ($OUT/<model>/sparsify*.md|png,
# symmetry_check.json, weak.md); copy the .md and .png to benchmarks/symmetry/.
set -eu
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/qlhs_symmetry}
mkdir -p "$OUT"
for m in eq3_softball_ds eq3w_softball_ds; do
  W="$OUT/$m"
  python -m qlhs_jax.main --config=configs/quickstart.py:$m --workdir="$W" \
    --config.progress_bar=False 2>&1 | tail -n 1
  python -m qlhs_jax.symmetry check --workdir "$W" --n 64
  python -m qlhs_jax.symmetry sparsify --workdir "$W" --steps 1000
  python -m qlhs_jax.symmetry sparsify --workdir "$W" --steps 1000 --no-mixing
done
python -m qlhs_jax.symmetry weak --workdir "$OUT/eq3_softball_ds"
