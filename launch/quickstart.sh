#!/usr/bin/env bash
# Set up the environment if needed, then train on 2 local workers with horovodrun.
#
#   bash launch/quickstart.sh                          # synthetic phantoms, about 3 minutes
#   bash launch/quickstart.sh --data /path/to/Training --image-size 96 --scratch-epochs 11
#
# Extra arguments go to python -m hvdmri.train and override the defaults below.
# Without --data it trains on the synthetic phantom set, generated once into
# ~/.cache/hvdmri, from random initialisation (no download needed).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVDMRI_VENV:-$repo/.venv}"
bash "$repo/launch/setup.sh"
cd "$repo"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
workers="${HVDMRI_WORKERS:-2}"
# Defaults sized for the phantom set on a small machine; later flags win in argparse.
exec "$venv/bin/horovodrun" --gloo -np "$workers" -H "localhost:$workers" \
  "$venv/bin/python" -m hvdmri.train \
  --weights none --image-size 64 --scratch-epochs 8 --run-dir "runs/quickstart-$(date +%Y%m%d-%H%M%S)" \
  "$@"
