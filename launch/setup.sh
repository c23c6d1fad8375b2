#!/usr/bin/env bash
# Create (or refresh) the hvdmri virtual environment: TensorFlow, Horovod built
# from source against it with the Gloo controller, and hvdmri itself.
#
#   bash launch/setup.sh            # first run: about 5 minutes on 2 cores
#   bash launch/setup.sh            # again: a few seconds when nothing changed
#   HVDMRI_VENV=/opt/hvdmri-env bash launch/setup.sh
#
# On a cluster, run it on every node (or once on a shared home folder): horovodrun
# starts `python` from the same path on every host.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/setup.sh [--force]

Creates the virtual environment at $HVDMRI_VENV (default: <repo>/.venv), installs
tensorflow-cpu 2.15.1, numpy<2, opencv-python-headless<4.11, scikit-learn, tqdm,
matplotlib and pytest, builds horovod 0.28.1 against that TensorFlow (Gloo always,
MPI when mpicxx is on the PATH), installs hvdmri in editable mode and checks
`horovodrun --check-build`.

  --force   reinstall even when the environment is already up to date
EOF
}

force=0
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --force) force=1 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HVDMRI_VENV:-$repo/.venv}"
python_bin="${PYTHON:-python3}"
tf_version="2.15.1"
horovod_version="0.28.1"

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# An explicit PYTHON must be the one the environment runs on; a venv cannot
# change its Python in place.
if [[ -n "${PYTHON:-}" && -x "$venv/bin/python" ]]; then
  version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?"; }
  wanted="$(version_of "$PYTHON")"
  have="$(version_of "$venv/bin/python")"
  if [[ "$wanted" != "$have" ]]; then
    fail "the environment at $venv runs Python $have but PYTHON=$PYTHON is Python $wanted; remove $venv or set HVDMRI_VENV to a new folder, then rerun"
  fi
fi

# A stamp over everything that decides the environment's content: when it matches
# and the imports work, there is nothing to do.
stamp_file="$venv/.hvdmri-setup-stamp"
stamp="$(cat "$repo/setup.cfg" "$repo/launch/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ $force -eq 0 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] \
   && "$venv/bin/python" -c "import horovod.tensorflow, hvdmri" 2>/dev/null; then
  say "environment at $venv is up to date"
  exit 0
fi

# Check the build tools before spending minutes on downloads.
missing=()
command -v "$python_bin" >/dev/null || missing+=("$python_bin (Python 3.9-3.11)")
command -v g++ >/dev/null || missing+=("g++ (C++ compiler, e.g. apt-get install g++)")
command -v cmake >/dev/null || missing+=("cmake (e.g. apt-get install cmake)")
if ((${#missing[@]})); then
  fail "missing build tools for Horovod: ${missing[*]}"
fi
"$python_bin" - <<'EOF' || fail "TensorFlow 2.15 needs Python 3.9 to 3.11; set PYTHON=/path/to/python3.11"
import sys
sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else 1)
EOF

if [[ ! -x "$venv/bin/python" ]]; then
  say "creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip "setuptools>=64" wheel

say "installing tensorflow-cpu $tf_version and the other dependencies"
"${pip[@]}" install --quiet "tensorflow-cpu==$tf_version" "numpy<2" \
  "opencv-python-headless<4.11" scikit-learn tqdm matplotlib pytest

# Horovod compiles its TensorFlow ops against the installed TensorFlow, so it must
# come after it, without build isolation (an isolated build would not see it).
if "$venv/bin/python" -c "import horovod, horovod.tensorflow, sys; sys.exit(horovod.__version__ != '$horovod_version')" 2>/dev/null; then
  say "horovod $horovod_version already built"
else
  # MPI only when mpicxx can build and link a program: Debian's openmpi-bin alone
  # puts an mpicxx on the PATH without the headers and library it needs.
  mpi_flag="HOROVOD_WITHOUT_MPI=1"
  probe_dir="$(mktemp -d)"
  if command -v mpicxx >/dev/null \
     && printf '#include <mpi.h>\nint main() { return MPI_Init(0, 0) ? 1 : 0; }\n' >"$probe_dir/probe.cc" \
     && mpicxx "$probe_dir/probe.cc" -o "$probe_dir/probe" >/dev/null 2>&1; then
    mpi_flag="HOROVOD_WITH_MPI=1"
    say "a working MPI compiler was found: building Horovod with MPI as well as Gloo"
  elif command -v mpicxx >/dev/null; then
    say "mpicxx cannot link an MPI program (install the MPI development package, e.g. libopenmpi-dev, for MPI); building with Gloo only"
  fi
  rm -rf "$probe_dir"
  say "building horovod $horovod_version from source (2-3 minutes on 2 cores)"
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
      HOROVOD_WITHOUT_MXNET=1 "$mpi_flag" \
      "${pip[@]}" install --quiet --no-build-isolation --no-cache-dir \
      "horovod==$horovod_version" \
    || fail "the Horovod build failed; the compiler output above names the cause (g++, cmake and the Python headers are needed)"
fi

say "installing hvdmri from $repo"
"${pip[@]}" install --quiet --no-build-isolation --no-deps -e "$repo"

check="$("$venv/bin/horovodrun" --check-build 2>&1)" || fail "horovodrun --check-build failed: $check"
for feature in TensorFlow Gloo; do
  grep -q "\[X\] $feature" <<<"$check" \
    || fail "Horovod was built without $feature; rerun with --force after fixing the build tools. Check output:
$check"
done
echo "$stamp" >"$stamp_file"
controllers="Gloo"
grep -q "\[X\] MPI" <<<"$check" && controllers="Gloo and MPI"
say "ready: $venv (Horovod with TensorFlow, $controllers)"
say "activate with: source \"$venv/bin/activate\""
