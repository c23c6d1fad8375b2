"""Training-step benchmark: images/s, step-time split and peak memory per worker.

    python -m hvdmri.bench --image-size 224 --batch-size 16 --steps 8
    python -m hvdmri.bench --config keras="--mode keras" --config hvdmri="--mode hvdmri" --repeats 2
    horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.bench --input real --data Training

Each run prints one JSON line. With several --config entries every configuration runs
as its own process, in rounds (A B A B ...), and a table of ratios against the first
configuration follows; --ratio A/B adds chosen pairs round by round. python -m
hvdmri.bench.scaling turns single-worker results into an estimate for N nodes.
docs/BENCHMARKS.md lists the measured figures.
"""
