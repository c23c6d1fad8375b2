#!/usr/bin/env bash
# bash launch/smoke.sh
#
# One-minute check that the install works on this node: two workers started with
#   horovodrun --gloo -np 2 -H localhost:2
# train one epoch at 32 px on a tiny synthetic phantom set (8 images per class,
# written to a temporary folder), then the run folder is checked for the model,
# metrics and a world size of 2. Prints "smoke: passed" and exits 0, or names what failed.
#
#   bash launch/smoke.sh --keep    # keep the temporary folder (data, run, logs) afterwards
#
# HVDMRI_VENV selects the environment (default <repo>/.venv); HVDMRI_SMOKE_TIMEOUT caps
# the training in seconds (default 300), so a hang ends with a failure, not a wait.
set -euo pipefail

keep=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --keep) keep=1 ;;
    *) echo "smoke.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVDMRI_VENV:-$repo/.venv}"
python="$venv/bin/python"
horovodrun="$venv/bin/horovodrun"
limit="${HVDMRI_SMOKE_TIMEOUT:-300}"
if [[ ! -x "$python" || ! -x "$horovodrun" ]]; then
  echo "smoke: FAIL: no environment with horovodrun at $venv; run launch/setup.sh first (or set HVDMRI_VENV)" >&2
  exit 1
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

work="$(mktemp -d "${TMPDIR:-/tmp}/hvdmri-smoke.XXXXXX")"
cleanup() {
  if ((keep)); then echo "smoke: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
started=$SECONDS

"$python" -c 'import sys; from hvdmri.data.synth import write_phantoms; write_phantoms(sys.argv[1], per_class=8, image_size=64)' \
  "$work/Training"

status=0
timeout --kill-after=15 "$limit" \
  "$horovodrun" --gloo -np 2 -H localhost:2 --start-timeout 60 \
  "$python" -m hvdmri.train --data "$work/Training" --run-dir "$work/run" \
  --weights none --image-size 32 --scratch-epochs 1 --batch-size 8 \
  >"$work/train.log" 2>&1 || status=$?
if ((status == 124 || status == 137)); then
  tail -n 20 "$work/train.log" >&2
  echo "smoke: FAIL: training did not finish within $limit s (HVDMRI_SMOKE_TIMEOUT); log above" >&2
  exit 1
elif ((status != 0)); then
  tail -n 30 "$work/train.log" >&2
  echo "smoke: FAIL: horovodrun exited with status $status; log above" >&2
  exit 1
fi

for name in model.keras metrics.json config.json history.csv; do
  if [[ ! -s "$work/run/$name" ]]; then
    echo "smoke: FAIL: the run folder lacks $name" >&2
    exit 1
  fi
done
world_size="$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["world_size"])' "$work/run/config.json")"
if [[ "$world_size" != 2 ]]; then
  echo "smoke: FAIL: config.json records world_size $world_size, expected 2" >&2
  exit 1
fi
echo "smoke: passed: 2 workers trained one epoch and wrote the run folder in $((SECONDS - started)) s"
