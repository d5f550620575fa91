#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice): create it, install, run on every worker, logs, delete.
#
#   launch/tpu_pod.sh create  NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-v5p us-east5-a v5p-64 (runtime v2-alpha-tpuv5)
#   launch/tpu_pod.sh install NAME ZONE                          # copy this checkout to every worker, pip install -e '.[tpu]'
#   launch/tpu_pod.sh train   NAME ZONE CONFIG WORKDIR [--config.a.b=value ...]
#   launch/tpu_pod.sh logs    NAME ZONE [WORKER]                 # tail the train log of one worker (default 0)
#   launch/tpu_pod.sh stop    NAME ZONE                          # interrupt the training process of every worker
#   launch/tpu_pod.sh delete  NAME ZONE
#
# `train` starts `python -m diffusion_jax train` on all workers at once (nohup, log in
# ~/diffusion_jax_train.log); diffusion_jax.distributed.initialize() lets JAX find the slice's
# coordinator and process ids itself. WORKDIR must be one directory every worker sees: a
# filesystem mounted on all hosts (e.g. Filestore). Check that a config fits first:
#   python launch/compile_check.py --config=CONFIG --topology=ACCELERATOR
# Needs the gcloud CLI, logged in, with a project set (gcloud config set project ...).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
# Prints a command, each argument shell-quoted, then runs it.
run() { printf '+'; printf ' %q' "$@"; printf '\n'; "$@"; }
# Quotes arguments for a remote shell (gcloud's --command is one string).
quote() { printf ' %q' "$@"; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/diffusion_jax'
LOG='~/diffusion_jax_train.log'
PID_FILE='~/diffusion_jax_train.pid'

[[ $# -ge 3 ]] || usage
action="$1"; name="$2"; zone="$3"; shift 3
tpu=(gcloud compute tpus tpu-vm)

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    accelerator="$1"; runtime="${2:-tpu-ubuntu2204-base}"
    run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$runtime"
    ;;
  install)
    archive="$(mktemp -t diffusion_jax.XXXXXX.tar.gz)"
    trap 'rm -f "$archive"' EXIT
    run git -C "$REPO_DIR" archive --format=tar.gz -o "$archive" HEAD
    run "${tpu[@]}" scp "$archive" "$name:~/diffusion_jax.tar.gz" --zone="$zone" --worker=all
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR \
&& tar -xzf ~/diffusion_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || usage
    config="$1"; workdir="$2"; shift 2
    remote_cmd="cd $REMOTE_DIR && nohup python3 -m diffusion_jax train$(quote "--config=$config" "--workdir=$workdir" "$@") \
> $LOG 2>&1 < /dev/null & echo \$! > $PID_FILE"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$remote_cmd"
    ;;
  logs)
    worker="${1:-0}"
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker="$worker" --command="tail -n 200 -f $LOG"
    ;;
  stop)
    run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="kill -INT \$(cat $PID_FILE) || true"
    ;;
  delete)
    run "${tpu[@]}" delete "$name" --zone="$zone" --quiet
    ;;
  *)
    usage
    ;;
esac
