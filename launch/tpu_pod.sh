#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: the same command on every worker (host) at once.
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b [--project=my-project] \
#     --config=configs/eq3.py --workdir=/mnt/shared/runs/eq3 [--setup] [--dry-run] \
#     [-- --config.batch_size=1024 ...]
#
# --setup first copies this checkout to ~/qlhs_jax on every worker and installs it with
# JAX for TPUs. Training runs `python3 -m qlhs_jax.main` there with QLHS_DISTRIBUTED=1:
# jax.distributed.initialize() finds the coordinator, the process count and each
# worker's id from the TPU VM's metadata. Rerunning the command resumes the run.
# --dry-run prints the gcloud commands and runs nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0"
  cat <<'USAGE'

Options:
  --tpu=NAME           the TPU VM (pod slice) name, required
  --zone=ZONE          its zone (e.g. us-central2-b), required
  --project=ID         the Google Cloud project (default: gcloud's configured one)
  --config=FILE[:ARG]  config file relative to the repository root, required
  --workdir=DIR        absolute path on a filesystem that every worker mounts at the
                       same place (orbax writes one checkpoint from all hosts), required
  --remote_dir=DIR     the checkout's directory on the workers, relative to the home
                       directory or absolute (qlhs_jax)
  --setup              copy this checkout to every worker and pip install it first
  --dry-run            print the commands, run nothing
  -- FLAGS...          passed on to qlhs_jax.main (--config.KEY=VALUE overrides)
USAGE
}

tpu="" zone="" project="" config="" workdir="" remote_dir="qlhs_jax" setup=0 DRY_RUN=0
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --setup) setup=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
require tpu "$tpu"
require zone "$zone"
require config "$config"
require workdir "$workdir"
[[ "$tpu" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || \
  die "--tpu=$tpu: a TPU name is lower-case letters, digits and hyphens"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || \
  die "--zone=$zone: expected a zone such as us-central2-b or europe-west4-a"
[[ -z "$project" || "$project" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || \
  die "--project=$project: not a Google Cloud project id"
[[ "$config" != /* ]] || die "--config=$config: give the path relative to the repository \
root; the workers read it from their copy of the checkout"
check_config "$config" "$REPO"
check_workdir "$workdir"
[[ "$workdir" == /* ]] || die "--workdir=$workdir: give an absolute path (the same on every worker)"
[[ "$remote_dir" =~ ^[-/._a-zA-Z0-9]+$ ]] || \
  die "--remote_dir=$remote_dir: letters, digits and -/._ only (relative to the home directory)"
check_overrides "$@"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" --worker=all)
[[ -z "$project" ]] || where+=(--project="$project")

if ((setup)); then
  # The package, its configs and what pyproject.toml needs to build it.
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="mkdir -p $remote_dir"
  run "${gcloud_tpu[@]}" scp --recurse "${where[@]}" "$REPO/pyproject.toml" \
    "$REPO/README.md" "$REPO/qlhs_jax" "$REPO/configs" "$tpu:$remote_dir/"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="cd $remote_dir && \
pip install -q -U 'jax[tpu]' && pip install -q -e ."
fi

# One string, run by each worker's shell: quote every piece for that shell.
printf -v flags ' %q' "--config=$config" "--workdir=$workdir" "$@"
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="cd $remote_dir && \
QLHS_DISTRIBUTED=1 PYTHONUNBUFFERED=1 python3 -m qlhs_jax.main$flags"
