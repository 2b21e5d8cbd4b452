# Shared by the launch scripts (sourced, not run): argument checks and dry runs.

die() {  # die MESSAGE: the script's usage error, on stderr, exit status 2
  echo "$(basename "$0"): error: $*" >&2
  echo "Run $(basename "$0") --help for the options." >&2
  exit 2
}

require() {  # require NAME VALUE: a mandatory option
  [[ -n "$2" ]] || die "--$1 is required"
}

check_uint() {  # check_uint NAME VALUE: a positive integer
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--$1 must be a positive integer, got '$2'"
}

check_config() {  # check_config SPEC [ROOT]: FILE[:ARG] whose FILE exists (under ROOT)
  local file="${1%%:*}"
  [[ "$file" == *.py ]] || die "--config=$1: expected a Python config file (configs/NAME.py[:ARG])"
  [[ -f "${2:+$2/}$file" ]] || die "--config=$1: no such file ${2:+$2/}$file"
}

check_workdir() {  # check_workdir DIR: a directory path the training code can write
  [[ "$1" != *://* ]] || die "--workdir=$1: qlhs_jax writes the workdir with file APIs; \
use a path on a filesystem every host mounts (NFS, Filestore, a gcsfuse mount of a bucket)"
}

check_overrides() {  # check_overrides ARGS...: what follows "--" goes to qlhs_jax.main
  local arg
  for arg in "$@"; do
    [[ "$arg" == --* ]] || die "'$arg' after -- is not a flag of qlhs_jax.main (--config.KEY=VALUE)"
  done
}

show() {  # show ARGS...: one command, shell-quoted so it can be pasted
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

run() {  # run ARGS...: prints the command; runs it unless DRY_RUN=1
  show "$@"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}
