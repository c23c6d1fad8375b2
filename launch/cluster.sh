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
  --elastic                  elastic training: keep going when workers are lost and take
                             them back when they return; horovodrun rereads HOSTFILE every
                             second through launch/discover_hosts.sh (adds --elastic to the
                             training flags; see docs/CLUSTER.md)
  --min-np N                 with --elastic: fewest workers to train with; below it the job
                             waits for hosts, up to --elastic-timeout (default 1)
  --max-np N                 with --elastic: most workers to start (default: no limit)
  --elastic-timeout SECONDS  with --elastic: how long to wait for --min-np workers after a
                             change (horovodrun's default: 600)
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
elastic=0
min_np=""
max_np=""
elastic_timeout=""
hostfile=""
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --network-interface|-p|--ssh-port|-i|--ssh-identity-file|--start-timeout|--output-filename|--worker-memory-gb|\
    --min-np|--max-np|--elastic-timeout)
      (($# >= 2)) || fail "$1 needs a value (see --help)"
      case "$1" in
        --network-interface) interfaces+=("$2") ;;
        -p|--ssh-port) ssh_port="$2" ;;
        -i|--ssh-identity-file) ssh_key="$2" ;;
        --start-timeout) start_timeout="$2" ;;
        --output-filename) output_dir="$2" ;;
        --worker-memory-gb) memory_gb="$2" ;;
        --min-np) min_np="$2" ;;
        --max-np) max_np="$2" ;;
        --elastic-timeout) elastic_timeout="$2" ;;
      esac
      shift 2 ;;
    --skip-preflight) skip_preflight=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --elastic) elastic=1; shift ;;
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
for pair in "--min-np:$min_np" "--max-np:$max_np" "--elastic-timeout:$elastic_timeout"; do
  flag="${pair%%:*}" value="${pair#*:}"
  [[ -z "$value" ]] && continue
  ((elastic)) || fail "$flag needs --elastic"
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || fail "$flag must be a positive whole number, got '$value'"
done
if ((elastic)); then
  min_np="${min_np:-1}"
  if [[ -n "$max_np" ]] && ((min_np > max_np)); then
    fail "--min-np $min_np is larger than --max-np $max_np"
  fi
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
if ((elastic)); then
  start_np="$slots"
  [[ -n "$max_np" ]] && ((start_np > max_np)) && start_np="$max_np"
  ((start_np < min_np)) && fail "--min-np $min_np is larger than the $slots slot(s) in $hostfile"
fi

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

if ((elastic)); then
  # The discovery script reads the hostfile the user edits, so removing or restoring
  # a line takes effect while the job runs. horovodrun runs it through a shell.
  discovery="$(printf '%q %q' "$repo/launch/discover_hosts.sh" "$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")")"
  launch=("$horovodrun" --gloo -np "$start_np" --min-np "$min_np" --host-discovery-script "$discovery")
  [[ -n "$max_np" ]] && launch+=(--max-np "$max_np")
  [[ -n "$elastic_timeout" ]] && launch+=(--elastic-timeout "$elastic_timeout")
  [[ " ${train_args[*]} " == *" --elastic "* ]] || train_args+=(--elastic)
else
  launch=("$horovodrun" --gloo -np "$slots" -hostfile "$bare_hostfile")
fi
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
