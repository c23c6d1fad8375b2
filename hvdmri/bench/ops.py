"""Sum the time of a training step's TensorFlow ops by op type, from the TensorFlow profiler.

    python -m hvdmri.bench.ops --precision mixed_bfloat16 --batch-size 16

Builds and compiles the model as `python -m hvdmri.bench --mode keras` does, runs
the warm-up steps, then traces the timed steps with tf.profiler and prints, for
each op type, the milliseconds and calls per step, largest first. The oneDNN
kernels appear as _MklNative... ops, the XLA kernels of hvdmri/fused_relu.py among
the asynchronous ops, and everything else (Eigen element-wise ops, casts, the
optimizer update) under its own name. Two inter-op threads run ops side by side,
so the op times of a step add up to more than its wall time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

from hvdmri.bench.options import PRECISIONS, BenchConfig
from hvdmri.cli import CommandParser, image_size, positive_int

# Host-plane events named "node_name:OpType" are op executions (node names contain no
# colon or space). The others are the executor's own spans, such as
# "ExecutorState::Process", which contain the ops.
OP_EVENT = re.compile(r"[^:\s]+:(\w+)")
# Asynchronous ops, which include the XLA kernels and the input iterator, carry no op
# name in their event. Their start spans are counted under one label.
ASYNC_START = "ExecutorState::ProcessAsync::Start"
ASYNC_LABEL = "(async ops: XLA kernels, input)"


def op_times(trace_dir: Path, steps: int) -> list[tuple[str, float, float]]:
    """Return (op type, ms per step, calls per step) from a tf.profiler trace, largest first."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    total_ms: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    files = sorted(trace_dir.rglob("*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"{trace_dir}: the profiler wrote no *.xplane.pb trace")
    for path in files:
        space = xplane_pb2.XSpace()
        space.ParseFromString(path.read_bytes())
        for plane in space.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    match = OP_EVENT.fullmatch(name)
                    if match is not None:
                        op_type = match.group(1)
                    elif name == ASYNC_START:
                        op_type = ASYNC_LABEL
                    else:
                        continue
                    total_ms[op_type] += event.duration_ps / 1e9
                    calls[op_type] += 1
    return [(op_type, ms / steps, calls[op_type] / steps) for op_type, ms in total_ms.most_common()]


def format_table(rows: list[tuple[str, float, float]], top: int) -> str:
    """Return the top rows as a Markdown table, the rest summed in one row."""
    total = sum(ms for _, ms, _ in rows) or 1.0
    lines = ["| op type | ms per step | calls per step | share of op time |", "| --- | --- | --- | --- |"]
    for op_type, ms, count in rows[:top]:
        lines.append(f"| {op_type} | {ms:.1f} | {count:g} | {100 * ms / total:.1f}% |")
    if len(rows) > top:
        rest = sum(ms for _, ms, _ in rows[top:])
        lines.append(f"| {len(rows) - top} other op types | {rest:.1f} | | {100 * rest / total:.1f}% |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m hvdmri.bench.ops",
                           description="Trace training steps of the hvdmri model with the TensorFlow "
                                       "profiler and print the time per op type.")
    defaults = BenchConfig()
    parser.add_argument("--image-size", type=image_size, default=defaults.image_size,
                        help=f"side of the square model input in pixels (default {defaults.image_size})")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help=f"images per step (default {defaults.batch_size})")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="Keras dtype policy; auto as in hvdmri.train (default auto)")
    parser.add_argument("--no-fused-relu", action="store_true",
                        help="keep TensorFlow's own ReLU and Add kernels in bf16")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="intra-op threads (default: the machine's cores)")
    parser.add_argument("--warmup-steps", type=positive_int, default=defaults.warmup_steps,
                        help=f"untimed steps before the trace (default {defaults.warmup_steps})")
    parser.add_argument("--steps", type=positive_int, default=2, help="traced steps (default 2)")
    parser.add_argument("--top", type=positive_int, default=25, help="op types to list (default 25)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = BenchConfig(name="ops", mode="keras", image_size=args.image_size, batch_size=args.batch_size,
                         precision=args.precision, threads=args.threads, no_fused_relu=args.no_fused_relu,
                         warmup_steps=args.warmup_steps, steps=args.steps, breakdown_steps=0)
    from hvdmri.bench.worker import compiled_model, make_input, start_workers

    start_workers(config)
    import tensorflow as tf

    from hvdmri.train import resolve_precision

    precision = resolve_precision(config.precision)
    tf.keras.mixed_precision.set_global_policy(precision)
    dataset = make_input(config, 0, 1)
    model = compiled_model(config, 1)
    model.fit(dataset, epochs=1, steps_per_epoch=config.warmup_steps, verbose=0)
    with tempfile.TemporaryDirectory(prefix="hvdmri-ops-") as trace_dir:
        tf.profiler.experimental.start(trace_dir)
        started = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=config.steps, verbose=0)
        wall_s = (time.perf_counter() - started) / config.steps
        tf.profiler.experimental.stop()
        rows = op_times(Path(trace_dir), config.steps)
    print(f"{precision}, {config.image_size} px, batch {config.batch_size}"
          f"{', TensorFlow ReLU kernels' if config.no_fused_relu else ''}: {wall_s:.3f} s per traced step "
          f"(the profiler adds its own cost)")
    print(format_table(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
