#!/usr/bin/env bash
# Renders launch/gke_jobset.yaml from the environment and applies it (a training run on a GKE TPU slice).
#
#   export NAME=... IMAGE=... CONFIG=... WORKDIR=... ACCELERATOR=... TOPOLOGY=... HOSTS=... CHIPS_PER_HOST=... PVC=...
#   launch/gke_jobset.sh [--dry-run]     # --dry-run: print the manifest and the command, apply nothing
#
# The variables are described at the top of gke_jobset.yaml; MAX_RESTARTS defaults to 10. A
# variable that is unset or empty is an error (envsubst alone would render it as nothing).
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
[[ $# -eq 0 ]] || { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

export MAX_RESTARTS="${MAX_RESTARTS:-10}"
VARIABLES=(NAME IMAGE CONFIG WORKDIR ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST PVC MAX_RESTARTS)
for variable in "${VARIABLES[@]}"; do
  if [[ -z "${!variable:-}" ]]; then
    echo "error: set $variable (see the top of launch/gke_jobset.yaml)" >&2
    exit 2
  fi
done
for variable in CONFIG WORKDIR; do
  if [[ "${!variable}" == *'"'* ]]; then
    echo "error: $variable must not contain a double quote" >&2
    exit 2
  fi
done

manifest="$(envsubst "$(printf '${%s} ' "${VARIABLES[@]}")" < "$(dirname "${BASH_SOURCE[0]}")/gke_jobset.yaml")"
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "$manifest"
  echo "+ kubectl apply -f -"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
