#!/usr/bin/env bash
# bash launch/bench.sh memory|compare|precision|link [OUT.jsonl]
#
# The four benchmark runs behind docs/BENCHMARKS.md, each one invocation of
# python -m hvdmri.bench that appends its JSON lines to OUT.jsonl (default bench-<what>.jsonl):
#   memory   peak RSS per worker at 224 px, batch 8/16/32/64, float32 and mixed_bfloat16,
#            then the fitted coefficients; python -m hvdmri.memory FILE... fits them over
#            several result files, which is how hvdmri/memory.py got its figures
#   compare  224 px, batch 8, three interleaved rounds: plain Keras, hvdmri np=1 (bf16 and
#            float32, synthetic and real input), hvdmri np=2, MultiWorkerMirroredStrategy np=2
#   precision  224 px, mixed_bfloat16 against float32 at batch 16 and 32, three rounds; at
#            batch 16 also bf16 with TensorFlow's own ReLU kernels (--no-fused-relu)
#   link     hvdmri np=2 with and without --fp16-allreduce on an emulated 1 Gbit/s link:
#            a network namespace whose loopback is shaped by tc's token bucket filter
#            (needs root; the namespace is deleted afterwards, also on failure)
#
# HVDMRI_VENV selects the environment (default <repo>/.venv); HVDMRI_DATA is the real
# training folder for the compare run (default ../shared/data/brain-tumor-mri/Training).
# A single worker set can also be started by horovodrun directly:
#   horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.bench --image-size 224 --batch-size 8
# The scaling estimate for more nodes is computed from the compare and precision files:
#   python -m hvdmri.bench.scaling bench-compare.jsonl bench-precision.jsonl
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

what="${1:-}"
case "$what" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; echo "bench.sh: name the run: memory, compare, precision or link" >&2; exit 2 ;;
  memory|compare|precision|link) ;;
  *) echo "bench.sh: unknown run '$what'; expected memory, compare, precision or link (see --help)" >&2; exit 2 ;;
esac
out="$(realpath -m "${2:-bench-$what.jsonl}")"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${HVDMRI_VENV:-$repo/.venv}/bin/python"
data="${HVDMRI_DATA:-$repo/../shared/data/brain-tumor-mri/Training}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$repo"

bench() { "$python" -m hvdmri.bench --out "$out" "$@"; }

if [[ "$what" == memory ]]; then
  configs=()
  for precision in float32 mixed_bfloat16; do
    for batch in 8 16 32 64; do
      configs+=(--config "${precision%%_*}-b$batch=--precision $precision --batch-size $batch")
    done
  done
  # In float32 the peak sometimes jumps by about 0.9 GiB after several steps (batch 32: 4.0 GiB,
  # in some runs 4.9 GiB from about the 10th step on), so each run takes 23 steps.
  bench --image-size 224 --warmup-steps 3 --steps 20 --breakdown-steps 0 --memory-fit "${configs[@]}"
elif [[ "$what" == compare ]]; then
  # Three rounds of ten timed steps: a 5% difference needs more than one noisy round.
  bench --image-size 224 --batch-size 8 --precision mixed_bfloat16 --warmup-steps 3 --steps 10 \
    --breakdown-steps 3 --repeats 3 \
    --config keras="--mode keras" --config hvdmri="" --config float32="--precision float32" \
    --config real="--input real --data $data" --config np2="--np 2" --config mwms2="--mode mwms --np 2" \
    --ratio hvdmri/keras --ratio hvdmri/float32 --ratio real/hvdmri --ratio np2/hvdmri --ratio np2/mwms2
elif [[ "$what" == precision ]]; then
  # bf16-b16-eigen keeps TensorFlow's own ReLU and Add kernels: what hvdmri/fused_relu.py brings.
  bench --image-size 224 --warmup-steps 3 --steps 8 --breakdown-steps 0 --repeats 3 \
    --config bf16-b16="--precision mixed_bfloat16 --batch-size 16" \
    --config bf16-b16-eigen="--precision mixed_bfloat16 --batch-size 16 --no-fused-relu" \
    --config float32-b16="--precision float32 --batch-size 16" \
    --config bf16-b32="--precision mixed_bfloat16 --batch-size 32" \
    --config float32-b32="--precision float32 --batch-size 32" \
    --ratio bf16-b16/float32-b16 --ratio bf16-b16-eigen/float32-b16 --ratio bf16-b16/bf16-b16-eigen \
    --ratio bf16-b32/float32-b32
else
  namespace="hvdmri-bench-$$"
  ip netns add "$namespace"
  trap 'ip netns delete "$namespace"' EXIT
  ip -n "$namespace" link set lo up
  # Every packet between the two local workers leaves through lo once, so both
  # directions share this one 1 Gbit/s bucket.
  ip netns exec "$namespace" tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 50ms
  # The gradient volume does not depend on the image size; 64 px keeps compute short.
  ip netns exec "$namespace" "$python" -m hvdmri.bench --out "$out" --np 2 --image-size 64 \
    --batch-size 8 --precision mixed_bfloat16 --warmup-steps 2 --steps 4 --breakdown-steps 3 --repeats 2 \
    --config float32-wire="" --config fp16-wire="--fp16-allreduce"
fi
