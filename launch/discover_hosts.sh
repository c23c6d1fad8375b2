#!/usr/bin/env bash
# launch/discover_hosts.sh hostfiles/lab-4x8gb.txt
#
# Host discovery for elastic training: print one "host:slots" line per host of a
# hostfile in horovodrun's format ("host slots=N" per line, "#" comments and blank
# lines allowed), the format launch/cluster.sh checks. horovodrun runs it every second:
#   horovodrun --gloo -np 2 --min-np 2 --max-np 4 \
#       --host-discovery-script "launch/discover_hosts.sh hostfiles/lab.txt" python -m hvdmri.train --elastic
# so deleting a line removes that host's workers and adding it back lets them rejoin.
# An invalid line makes it exit 1: horovodrun then stops at start-up, and keeps the
# last good host list (with a warning) when the file breaks during a run.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if (($# != 1)); then
  echo "discover_hosts.sh: error: expected exactly one argument, the HOSTFILE (see --help)" >&2
  exit 2
fi
hostfile="$1"
if [[ ! -r "$hostfile" ]]; then
  echo "discover_hosts.sh: error: hostfile '$hostfile' not found or not readable" >&2
  exit 1
fi

awk -v file="$hostfile" '
  { sub(/#.*/, ""); sub(/^[ \t]+/, ""); sub(/[ \t\r]+$/, "") }
  $0 == "" { next }
  NF == 2 && $2 ~ /^slots=[1-9][0-9]*$/ { sub(/^slots=/, "", $2); print $1 ":" $2; next }
  {
    printf "discover_hosts.sh: error: %s line %d: expected \"host slots=N\" with N >= 1, got \"%s\"\n",
      file, FNR, $0 > "/dev/stderr"
    failed = 1
  }
  END { exit failed }
' "$hostfile"
