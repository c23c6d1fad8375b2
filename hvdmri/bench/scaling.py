"""Estimate images/s on N nodes from measured one-worker step times and the ring-allreduce volume.

    python -m hvdmri.bench.scaling bench-compare.jsonl bench-precision.jsonl --nodes 1 4 8

This is arithmetic, not a measurement. Single-worker hvdmri runs in the files are
grouped by name, image size, precision and batch size. For each group the estimate
assumes one worker per node, with the group's median step time as the compute time. A ring allreduce
sends and receives 2 * (N - 1) / N times the gradient bytes per worker and step.
The network time is that volume divided by the link's payload rate per direction,
for float32 gradients and for --fp16-allreduce (half the bytes). Two bounds
follow: no overlap of network and compute (step = compute + network) and full
overlap (step = the larger of the two).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

from hvdmri.bench.results import read_results, single_worker_runs
from hvdmri.cli import CommandParser, positive_float, positive_int

# TCP payload of a full-duplex 1 GbE link per direction, after Ethernet, IP and TCP headers.
GIGABIT_PAYLOAD_MB_S = 117.0


@dataclass(frozen=True)
class Measured:
    """One configuration's median single-worker step."""

    name: str
    image_size: int
    precision: str
    batch_size: int
    step_s: float
    rounds: int


def measured_steps(lines: list[dict]) -> list[Measured]:
    """Return the median step time of every single-worker hvdmri configuration, in file order.

    Runs are grouped by name, image size, batch size and precision, so equal names
    from different files stay apart when they measured different things.
    """
    steps: dict[tuple, list[float]] = {}
    for line in single_worker_runs(lines):
        key = (line["name"], line["image_size"], line["precision_used"], line["batch_size"])
        steps.setdefault(key, []).append(line["step_s"])
    return [Measured(name, size, precision, batch, statistics.median(values), len(values))
            for (name, size, precision, batch), values in steps.items()]


def ring_allreduce_s(nodes: int, gradient_bytes: float, link_mb_s: float) -> float:
    """Return the seconds of network time per worker for one ring allreduce (0 for one node)."""
    return 2 * (nodes - 1) / nodes * gradient_bytes / (link_mb_s * 1e6)


def estimate_table(runs: list[Measured], nodes: list[int], gradient_bytes: float, link_mb_s: float) -> str:
    """Format the estimate as a Markdown table, one row per configuration and node count."""
    rows = ["| configuration | image size | precision | batch | nodes | network s/step, float32 / fp16 | "
            "images/s, no overlap, float32 / fp16 | images/s, full overlap, float32 / fp16 | "
            "speed-up over 1 node, no overlap, float32 / fp16 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        single_node = run.batch_size / run.step_s
        for count in nodes:
            network = ring_allreduce_s(count, gradient_bytes, link_mb_s)
            network_fp16 = ring_allreduce_s(count, gradient_bytes / 2, link_mb_s)
            images = count * run.batch_size
            serial = images / (run.step_s + network)
            serial_fp16 = images / (run.step_s + network_fp16)
            overlapped = images / max(run.step_s, network)
            overlapped_fp16 = images / max(run.step_s, network_fp16)
            rows.append(f"| {run.name} | {run.image_size} | {run.precision} | {run.batch_size} | {count} | "
                        f"{network:.2f} / {network_fp16:.2f} | {serial:.1f} / {serial_fp16:.1f} | "
                        f"{overlapped:.1f} / {overlapped_fp16:.1f} | "
                        f"{serial / single_node:.1f} / {serial_fp16 / single_node:.1f} |")
    return "\n".join(rows)


def gradient_bytes_of_model() -> int:
    """Return the float32 gradient bytes of the hvdmri model with the whole network trainable."""
    from hvdmri.model import build_model, set_trainable

    # The weight count does not depend on the input size, so a small input builds faster.
    model = build_model(4, 32, weights=None)
    set_trainable(model, "conv1", freeze_batchnorm=False)
    return 4 * sum(int(variable.shape.num_elements()) for variable in model.trainable_variables)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m hvdmri.bench.scaling",
                           description="Estimate images/s on N nodes from the single-worker runs of a "
                                       "python -m hvdmri.bench results file and the ring-allreduce volume.")
    parser.add_argument("results", nargs="+", help="files of JSON lines written by python -m hvdmri.bench --out")
    parser.add_argument("--nodes", type=positive_int, nargs="+", default=[1, 4, 8],
                        help="node counts to estimate, one worker per node (default 1 4 8)")
    parser.add_argument("--link-mb-s", type=positive_float, default=GIGABIT_PAYLOAD_MB_S,
                        help="payload rate of the link per direction in MB/s "
                             f"(default {GIGABIT_PAYLOAD_MB_S:g}, full-duplex 1 GbE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lines = read_results(args.results, ("name", "mode", "world_size", "precision_used", "batch_size",
                                            "image_size", "step_s"))
    except ValueError as error:
        parser.error(str(error))
    runs = measured_steps(lines)
    if not runs:
        parser.error(f"no successful single-worker hvdmri run in {', '.join(args.results)} to start from")

    gradient_bytes = gradient_bytes_of_model()
    print(f"gradient volume: {gradient_bytes / 1e6:.1f} MB float32 per step; link {args.link_mb_s:g} MB/s "
          "per direction")
    for run in runs:
        print(f"{run.name} ({run.image_size} px, batch {run.batch_size}, {run.precision}): median step "
              f"{run.step_s:.3f} s over {run.rounds} run(s)")
    print(estimate_table(runs, args.nodes, gradient_bytes, args.link_mb_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
