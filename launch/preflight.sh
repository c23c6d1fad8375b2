#!/usr/bin/env bash
# launch/preflight.sh hostfiles/lab-4x8gb.txt --data /srv/mri/Training --batch-size 16
#
# Check every host of a hostfile before training, without starting it. The checks:
# ssh key login; the same Python, hvdmri, TensorFlow and Horovod (with Gloo) as this
# node; cores per slot; memory for the batch and image size (an estimate); the data
# folder and its file count; free disk for the run folder on rank 0's host; network
# interfaces. One verdict line per host and check. Exit status: 0 passed, 1 a check failed,
# 2 invalid hostfile or flags. launch/cluster.sh runs the same checks before training.
#
#   launch/preflight.sh -p 2222 -i ~/.ssh/lab_key --network-interface eth0 \
#       hostfiles/lab-4x8gb.txt --data /srv/mri/Training --image-size 224
#
# Options before HOSTFILE configure the checks (see --help); everything after it is
# the training command line. HVDMRI_VENV selects the environment (default <repo>/.venv).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVDMRI_VENV:-$repo/.venv}"
python="$venv/bin/python"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  echo
  if [[ -x "$python" ]]; then
    exec "$python" -m hvdmri.preflight --help
  fi
  exit 0
fi

if [[ ! -x "$python" ]]; then
  echo "preflight.sh: no Python environment at $venv; run launch/setup.sh first (or set HVDMRI_VENV)" >&2
  exit 2
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$python" -m hvdmri.preflight --python "$python" "$@"
