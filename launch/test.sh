#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite.
#
#   bash launch/test.sh                 # everything (about 45 minutes on 2 cores)
#   bash launch/test.sh -m "not slow"   # the fast tests only (about 3 minutes)
#   bash launch/test.sh tests/test_split.py -x
#
# Arguments go to pytest. Tests that read the real MRI images skip, with the
# reason, when ../shared/data/brain-tumor-mri is absent.
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
exec "$venv/bin/python" -m pytest -ra "$@"
