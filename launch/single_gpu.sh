#!/usr/bin/env bash
# Training on one GPU host (one process, every visible GPU, data parallel).
#
#   launch/single_gpu.sh --config=configs/eq3.py:hardball_ds --workdir=$HOME/runs/eq3_hb \
#     [--gpus=0,1] [--python=python3] [--dry-run] [-- --config.batch_size=128 ...]
#
# Runs `python -m qlhs_jax.main` with the environment below; rerunning the same command
# resumes the run in --workdir. --dry-run prints the command and runs nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,8s/^# \{0,1\}//p' "$0"
  cat <<'USAGE'

Options:
  --config=FILE[:ARG]  ml_collections config file (configs/*.py), required
  --workdir=DIR        checkpoints, metrics and the run's config, required
  --gpus=LIST          GPU indices to use (CUDA_VISIBLE_DEVICES), default: all
  --python=EXE         the Python interpreter with qlhs_jax installed (python3)
  --dry-run            print the command, run nothing
  -- FLAGS...          passed on to qlhs_jax.main (--config.KEY=VALUE overrides)
USAGE
}

config="" workdir="" gpus="" python="python3" DRY_RUN=0
while (($#)); do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --gpus=*) gpus="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
require config "$config"
require workdir "$workdir"
check_config "$config"
check_workdir "$workdir"
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || \
  die "--gpus must be comma-separated GPU indices such as 0 or 0,1, got '$gpus'"
check_overrides "$@"

env_vars=(
  # The train step takes nearly all of the GPU's memory (the input pipeline runs on the
  # host); JAX preallocates 75% by default.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  # Overlaps the gradient all-reduce with the backward pass when there are several GPUs.
  "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
  PYTHONUNBUFFERED=1
)
[[ -z "$gpus" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")

run env "${env_vars[@]}" "$python" -m qlhs_jax.main "--config=$config" \
  "--workdir=$workdir" "$@"
