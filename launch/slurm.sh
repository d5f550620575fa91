#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU (default) or one per node driving all its GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR [--config.a.b=value ...]
#   PER=node sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR [...]
#   GPUS_PER_NODE=4 PYTHON=/path/to/venv/bin/python sbatch ... launch/slurm.sh ...
#   bash launch/slurm.sh --dry-run CONFIG WORKDIR [...]   # print the srun command, run nothing
#
# srun starts the processes; diffusion_jax.distributed.initialize() reads the SLURM
# environment through JAX (coordinator = first node of the step, port from the job id;
# process id = SLURM_PROCID). With PER=node each process is told its GPUs through
# DIFFUSION_JAX_LOCAL_DEVICE_IDS, since JAX would otherwise give it only GPU SLURM_LOCALID.
# WORKDIR must be on a filesystem all nodes share. Run from the repository root, with
# diffusion_jax installed (pip install -e .) in the Python that PYTHON names.
# Preemption and time limits: --signal=TERM@300 has SLURM send SIGTERM to every task 300 s
# before the time limit, and the training loop answers SIGTERM by saving the step it is at and
# exiting 0; --requeue puts the job back in the queue when it is preempted or its node fails,
# and the requeued job resumes from the newest checkpoint in WORKDIR (the log is appended to).
# A run longer than one time limit: submit it again (or with --dependency=afterany:<job id>).
#SBATCH --job-name=diffusion_jax
#SBATCH --exclusive
#SBATCH --output=diffusion_jax-%j.log
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
#SBATCH --requeue
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

if [[ $# -lt 2 ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
per="${PER:-gpu}"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
python="${PYTHON:-python3}"
nodes="${SLURM_JOB_NUM_NODES:-1}"

case "$per" in
  gpu)
    # Every task sees all GPUs of its node and JAX picks GPU SLURM_LOCALID (a per-task
    # binding would renumber the one visible GPU to 0 and break that choice).
    run srun --nodes="$nodes" --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node" --kill-on-bad-exit=1 \
      "$python" -m diffusion_jax train "--config=$config" "--workdir=$workdir" "$@"
    ;;
  node)
    ids="$(seq -s, 0 $((gpus_per_node - 1)))"
    run srun --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus_per_node" --kill-on-bad-exit=1 \
      --export=ALL,DIFFUSION_JAX_LOCAL_DEVICE_IDS="$ids" \
      "$python" -m diffusion_jax train "--config=$config" "--workdir=$workdir" "$@"
    ;;
  *)
    echo "error: PER=$per; use PER=gpu or PER=node" >&2
    exit 2
    ;;
esac
