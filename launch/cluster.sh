#!/usr/bin/env bash
# launch/cluster.sh hostfiles/lab-4x8gb.txt --data /srv/mri/Training --run-dir /srv/runs/resnet50
#
# Train on the hosts of a hostfile: validate the hostfile, count its slots, run the
# pre-flight checks (launch/preflight.sh), then start one worker per slot with
#   horovodrun --gloo -np N -hostfile FILE [--network-interface IF] [-p PORT -i KEY] \
#       <venv>/bin/python -m hvdmri.train ...
# Options before HOSTFILE are for the launch; everything after it goes to training.
# The environment's python must exist at the same path on every host.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'

Usage: launch/cluster.sh [OPTIONS] HOSTFILE [TRAINING FLAGS...]

Options:
  --network-interface NAME   interface for Horovod's traffic (repeatable); passed to
                             horovodrun and checked on every host by pre-flight
  -p, --ssh-port PORT        ssh port of every host (default: ssh's own)
  -i, --ssh-identity-file KEY
                             private key for ssh; the path must not contain spaces,
                             because horovodrun 0.28.1 puts it unquoted into its ssh command
  --start-timeout SECONDS    horovodrun's limit for reaching the hosts and starting the
                             workers (horovodrun's default: 30)
  --output-filename DIR      also write each rank's output to DIR/rank.N/{stdout,stderr}
  --worker-memory-gb GIB     memory one worker needs, for the pre-flight memory check
                             (default: an estimate from --batch-size and --image-size)
  --skip-preflight           start horovodrun right after the hostfile check
  --dry-run                  run the checks, print the horovodrun command, do not train
  -h, --help                 show this help

Environment:
  HVDMRI_VENV   environment whose python and horovodrun are used (default <repo>/.venv)

Examples:
  launch/cluster.sh hostfiles/localhost.txt --weights none --image-size 64 --scratch-epochs 2
  launch/cluster.sh --network-interface eth0 -p 2222 -i ~/.ssh/lab_key \
      hostfiles/lab-4x8gb.txt --data /srv/mri/Training --fp16-allreduce
USAGE
}

fail() { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVDMRI_VENV:-$repo/.venv}"
python="$venv/bin/python"
horovodrun="$venv/bin/horovodrun"

interfaces=()
ssh_port=""
ssh_key=""
start_timeout=""
output_dir=""
memory_gb=""
skip_preflight=0
dry_run=0
hostfile=""
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --network-interface|-p|--ssh-port|-i|--ssh-identity-file|--start-timeout|--output-filename|--worker-memory-gb)
      (($# >= 2)) || fail "$1 needs a value (see --help)"
      case "$1" in
        --network-interface) interfaces+=("$2") ;;
        -p|--ssh-port) ssh_port="$2" ;;
        -i|--ssh-identity-file) ssh_key="$2" ;;
        --start-timeout) start_timeout="$2" ;;
        --output-filename) output_dir="$2" ;;
        --worker-memory-gb) memory_gb="$2" ;;
      esac
      shift 2 ;;
    --skip-preflight) skip_preflight=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -*) fail "unknown option '$1' before HOSTFILE (training flags go after HOSTFILE; see --help)" ;;
    *) hostfile="$1"; shift; break ;;
  esac
done
train_args=("$@")

[[ -n "$hostfile" ]] || fail "HOSTFILE is missing (see --help)"
[[ -x "$python" && -x "$horovodrun" ]] \
  || fail "no Python environment with horovodrun at $venv; run launch/setup.sh first (or set HVDMRI_VENV)"
if [[ -n "$ssh_port" && ! "$ssh_port" =~ ^[0-9]+$ ]]; then
  fail "--ssh-port must be a port number, got '$ssh_port'"
fi
if [[ -n "$start_timeout" && ! "$start_timeout" =~ ^[0-9]+$ ]]; then
  fail "--start-timeout must be a whole number of seconds, got '$start_timeout'"
fi
if [[ -n "$ssh_key" ]]; then
  [[ "$ssh_key" =~ [[:space:]] ]] && fail "--ssh-identity-file '$ssh_key' contains a space; horovodrun 0.28.1 cannot pass it to ssh, so move the key"
  [[ -r "$ssh_key" ]] || fail "--ssh-identity-file '$ssh_key' not found or not readable"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# horovodrun 0.28.1 cannot read comments or blank lines, so it gets a bare copy.
bare_hostfile="$(mktemp "${TMPDIR:-/tmp}/hvdmri-hostfile.XXXXXX")"
trap 'rm -f "$bare_hostfile"' EXIT
status=0
"$python" -m hvdmri.preflight --print-hostfile "$hostfile" >"$bare_hostfile" || status=$?
((status == 0)) || exit "$status"
slots="$(awk -F'slots=' '{ total += $2 } END { print total }' "$bare_hostfile")"
hosts="$(wc -l <"$bare_hostfile")"
echo "cluster.sh: $hosts host(s), $slots worker(s) from $hostfile"

if ((skip_preflight == 0)); then
  checks=(--python "$python")
  for name in "${interfaces[@]}"; do checks+=(--network-interface "$name"); done
  [[ -n "$ssh_port" ]] && checks+=(--ssh-port "$ssh_port")
  [[ -n "$ssh_key" ]] && checks+=(--ssh-identity-file "$ssh_key")
  [[ -n "$memory_gb" ]] && checks+=(--worker-memory-gb "$memory_gb")
  "$python" -m hvdmri.preflight "${checks[@]}" "$hostfile" "${train_args[@]}" || status=$?
  if ((status != 0)); then
    echo "cluster.sh: pre-flight failed (exit status $status); training not started" >&2
    exit "$status"
  fi
fi

launch=("$horovodrun" --gloo -np "$slots" -hostfile "$bare_hostfile")
for name in "${interfaces[@]}"; do launch+=(--network-interface "$name"); done
[[ -n "$ssh_port" ]] && launch+=(-p "$ssh_port")
[[ -n "$ssh_key" ]] && launch+=(-i "$ssh_key")
[[ -n "$start_timeout" ]] && launch+=(--start-timeout "$start_timeout")
[[ -n "$output_dir" ]] && launch+=(--output-filename "$output_dir")
launch+=("$python" -m hvdmri.train "${train_args[@]}")

printf 'cluster.sh: running:'
printf ' %q' "${launch[@]}"
printf '\n'
if ((dry_run)); then
  exit 0
fi
"${launch[@]}" || status=$?
if ((status != 0)); then
  echo "cluster.sh: training failed: horovodrun exited with status $status; its output above names the first rank that failed ('Process name: R')" >&2
fi
exit "$status"
