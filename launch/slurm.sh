#!/usr/bin/env bash
# Training on a multi-node GPU cluster under SLURM: writes a batch script and submits it.
#
#   launch/slurm.sh --config=configs/eq3.py --workdir=/shared/runs/eq3 --nodes=2 \
#     --gpus_per_node=8 [--per=gpu|node] [--partition=P] [--account=A] [--time=24:00:00] \
#     [--dry-run] [-- --config.batch_size=512 ...]
#
# srun starts one process per GPU (--per=gpu, the default) or one per node driving all
# of its GPUs (--per=node), each running `python -m qlhs_jax.main` with
# QLHS_DISTRIBUTED=1. jax.distributed.initialize() reads the process count and ids from
# SLURM_NTASKS / SLURM_PROCID and takes the first node of SLURM_STEP_NODELIST as the
# coordinator (port 61440 + SLURM_JOB_ID mod 4096, or --port). The config file, the
# workdir and the Python environment must be visible on every node (a shared
# filesystem; sbatch passes the submitting shell's environment, so activate the
# virtual environment first). --dry-run prints the batch script and the sbatch command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,16s/^# \{0,1\}//p' "$0"
  cat <<'USAGE'

Options:
  --config=FILE[:ARG]  config file (on the shared filesystem), required
  --workdir=DIR        run directory on the shared filesystem, required; the batch
                       script and SLURM's output (slurm-JOBID.out) go there too
  --nodes=N            number of nodes, required
  --gpus_per_node=G    GPUs per node, required
  --per=gpu|node       one process per GPU (default) or one per node
  --partition=P, --account=A, --time=T, --job_name=NAME, --cpus_per_task=C
                       passed to sbatch (T as [D-]HH:MM:SS)
  --port=PORT          the coordinator's port (default: derived from the job id)
  --python=EXE         the Python interpreter with qlhs_jax installed (python3)
  --dry-run            print the batch script and the sbatch command, run nothing
  -- FLAGS...          passed on to qlhs_jax.main (--config.KEY=VALUE overrides)
USAGE
}

config="" workdir="" nodes="" gpus="" per="gpu" partition="" account="" time_limit=""
job_name="qlhs" cpus="" port="" python="python3" DRY_RUN=0
while (($#)); do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --cpus_per_task=*) cpus="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
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
require nodes "$nodes"
require gpus_per_node "$gpus"
check_config "$config"
check_workdir "$workdir"
check_uint nodes "$nodes"
check_uint gpus_per_node "$gpus"
[[ "$per" == gpu || "$per" == node ]] || die "--per must be 'gpu' or 'node', got '$per'"
[[ -z "$time_limit" || "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || \
  die "--time=$time_limit: expected [D-]HH:MM:SS (e.g. 24:00:00 or 2-00:00:00)"
[[ -z "$cpus" ]] || check_uint cpus_per_task "$cpus"
[[ -z "$port" || ( "$port" =~ ^[0-9]+$ && "$port" -ge 1024 && "$port" -le 65535 ) ]] || \
  die "--port must be a port number in 1024..65535, got '$port'"
for name in partition account job_name; do
  [[ "${!name}" =~ ^[-_.a-zA-Z0-9]*$ ]] || die "--$name=${!name}: letters, digits and -_. only"
done
check_overrides "$@"
if [[ "$DRY_RUN" != 1 ]] && ! command -v sbatch >/dev/null; then
  die "sbatch not found: run this on the cluster's login node (or use --dry-run)"
fi

# Every node reads the same absolute paths.
config_file="$(realpath "${config%%:*}")"
if [[ "$config" == *:* ]]; then
  config="$config_file:${config#*:}"
else
  config="$config_file"
fi
workdir="$(realpath -m "$workdir")"
script="$workdir/$job_name.sbatch"
if [[ "$per" == gpu ]]; then tasks=$gpus; else tasks=1; fi

sbatch_lines=(
  "--job-name=$job_name" "--nodes=$nodes" "--ntasks-per-node=$tasks"
  # Per node, not per task: every task sees all of its node's GPUs, and JAX picks GPU
  # SLURM_LOCALID for its process (--per=gpu) or keeps them all (--per=node).
  "--gpus-per-node=$gpus" "--output=$workdir/slurm-%j.out"
)
[[ -z "$partition" ]] || sbatch_lines+=("--partition=$partition")
[[ -z "$account" ]] || sbatch_lines+=("--account=$account")
[[ -z "$time_limit" ]] || sbatch_lines+=("--time=$time_limit")
[[ -z "$cpus" ]] || sbatch_lines+=("--cpus-per-task=$cpus")

srun_cmd=(srun --kill-on-bad-exit=1 "$python" -m qlhs_jax.main "--config=$config"
          "--workdir=$workdir" "$@")
batch="#!/bin/bash
# Written by launch/slurm.sh ($nodes nodes x $gpus GPUs, one process per $per).
$(printf '#SBATCH %s\n' "${sbatch_lines[@]}")
set -euo pipefail
export QLHS_DISTRIBUTED=1 PYTHONUNBUFFERED=1
# The train step takes nearly all of each GPU's memory (JAX preallocates 75% by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# Overlaps the gradient all-reduce with the backward pass.
export XLA_FLAGS=\"--xla_gpu_enable_latency_hiding_scheduler=true\${XLA_FLAGS:+ \$XLA_FLAGS}\""
if [[ "$per" == node ]]; then
  batch+="
# JAX's SLURM detection would give each process only GPU SLURM_LOCALID (0 here).
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))"
fi
if [[ -n "$port" ]]; then
  batch+="
export JAX_COORDINATOR_PORT=$port"
fi
batch+="
$(show "${srun_cmd[@]}")"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# $script:"
  echo "$batch"
  echo "# submit:"
  show sbatch "$script"
else
  mkdir -p "$workdir"
  echo "$batch" > "$script"
  echo "wrote $script"
  run sbatch "$script"
fi
