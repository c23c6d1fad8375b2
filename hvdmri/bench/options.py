"""The benchmark's flags: one configuration per run, several for a comparison."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from dataclasses import dataclass

from hvdmri.cli import CommandParser, image_size, non_negative_float, non_negative_int, positive_int
from hvdmri.distributed import CYCLE_TIME_MS

MODES = ("hvdmri", "keras", "mwms")
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
INPUTS = ("synthetic", "real")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")

EXAMPLES = """examples:
  # one configuration, one process: synthetic input at 224 px
  python -m hvdmri.bench --steps 8

  # the Horovod wrapper against plain Keras model.fit, two interleaved rounds
  python -m hvdmri.bench --config keras="--mode keras" --config hvdmri="--mode hvdmri" --repeats 2

  # 2 workers: hvdmri through horovodrun against MultiWorkerMirroredStrategy on 127.0.0.1
  python -m hvdmri.bench --config mwms="--mode mwms --np 2" --config hvdmri="--np 2"

  # started by horovodrun directly, every process is a worker
  horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.bench --input real --data Training
"""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration; every field goes into the JSON line."""

    name: str = "run"
    mode: str = "hvdmri"
    input: str = "synthetic"
    data: str | None = None
    np: int = 1
    image_size: int = 224
    batch_size: int = 16
    precision: str = "auto"
    threads: int | None = None
    fp16_allreduce: bool = False
    augment: bool = False
    no_fused_relu: bool = False
    cycle_time_ms: float | None = None
    warmup_steps: int = 3
    steps: int = 8
    breakdown_steps: int = 4
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m hvdmri.bench",
                           description="Time training steps of the hvdmri model and report images/s, "
                                       "the step-time split and peak memory per worker.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    run = parser.add_argument_group("one configuration")
    run.add_argument("--mode", choices=MODES, default=d.mode,
                     help="hvdmri: model.fit with Horovod's DistributedOptimizer and callbacks, as "
                          "hvdmri.train runs it; keras: plain model.fit, no Horovod; mwms: TensorFlow's "
                          "MultiWorkerMirroredStrategy with --np workers on 127.0.0.1 (default hvdmri)")
    run.add_argument("--input", choices=INPUTS, default=d.input,
                     help="synthetic: one random batch held in memory; real: the hvdmri tf.data pipeline "
                          "on --data (default synthetic)")
    run.add_argument("--data", help="with --input real: a folder with one subfolder per class")
    run.add_argument("--np", type=positive_int, default=d.np,
                     help="workers on this machine; hvdmri mode starts them with horovodrun "
                          "(ignored when horovodrun started this process) (default 1)")
    run.add_argument("--image-size", type=image_size, default=d.image_size,
                     help=f"side of the square model input in pixels (default {d.image_size})")
    run.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                     help=f"images per worker per step (default {d.batch_size})")
    run.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                     help="Keras dtype policy; auto as in hvdmri.train (default auto)")
    run.add_argument("--threads", type=positive_int, default=None,
                     help="intra-op threads per worker (default: cores divided by --np)")
    run.add_argument("--fp16-allreduce", action="store_true",
                     help="hvdmri mode: send gradients as float16 in the allreduce")
    run.add_argument("--augment", action="store_true",
                     help="with --input real: apply the training augmentation (default off)")
    run.add_argument("--no-fused-relu", action="store_true",
                     help="keep TensorFlow's own ReLU and Add kernels in bf16 (hvdmri uses XLA-compiled "
                          "ones there; see hvdmri/fused_relu.py), to measure what they bring")
    run.add_argument("--cycle-time-ms", type=non_negative_float, default=None,
                     help="hvdmri mode: how often Horovod's background thread looks for tensors to "
                          "allreduce, in ms (HOROVOD_CYCLE_TIME). Default: as in hvdmri.train, horovodrun's "
                          f"--cycle-time-ms or an exported HOROVOD_CYCLE_TIME if set, else {CYCLE_TIME_MS} "
                          "(Horovod's own default is 1)")
    run.add_argument("--warmup-steps", type=positive_int, default=d.warmup_steps,
                     help=f"untimed steps first: graph tracing and memory allocation (default {d.warmup_steps})")
    run.add_argument("--steps", type=positive_int, default=d.steps,
                     help=f"timed training steps (default {d.steps})")
    run.add_argument("--breakdown-steps", type=non_negative_int, default=d.breakdown_steps,
                     help="hvdmri mode: extra steps, after the timed ones, that time input wait, "
                          f"compute, allreduce and update separately; 0 skips them (default {d.breakdown_steps})")
    run.add_argument("--seed", type=int, default=d.seed, help=f"random data and weights seed (default {d.seed})")

    compare = parser.add_argument_group("several configurations")
    compare.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                         help="a named configuration: flags from the group above that override the "
                              "command line's; repeat to compare, the first is the baseline")
    compare.add_argument("--repeats", type=positive_int, default=1,
                         help="rounds; each round runs every configuration once, in order (default 1)")
    compare.add_argument("--ratio", action="append", default=[], metavar="NAME/NAME",
                         help="also print the images/s ratio of these two configurations for every round "
                              "(repeatable)")
    compare.add_argument("--out", help="append every JSON line to this file")
    compare.add_argument("--memory-fit", action="store_true",
                         help="after the runs, fit peak RSS = a + b * batch * (size/224)^2 per precision "
                              "and print the coefficients")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


COMPARE_ONLY = ("config", "repeats", "ratio", "out", "memory_fit", "worker", "result")


def config_from_args(args: argparse.Namespace, name: str = "run") -> BenchConfig:
    values = {key: value for key, value in vars(args).items() if key not in COMPARE_ONLY}
    return BenchConfig(name=name, **values)


def parse_named_configs(parser: argparse.ArgumentParser, argv: list[str], specs: list[str]) -> list[BenchConfig]:
    """Turn each NAME=FLAGS into a configuration: the command line's flags, then FLAGS on top."""
    configs = []
    for spec in specs:
        name, separator, flags = spec.partition("=")
        if not separator or not name:
            parser.error(f"--config {spec!r}: expected NAME=FLAGS, e.g. bf16=\"--precision mixed_bfloat16\"")
        if not CONFIG_NAME.fullmatch(name):
            parser.error(f"--config {name!r}: a name is letters, digits, '.', '_' and '-', starting with a "
                         "letter or digit, because it also names the run's result file")
        if name in (config.name for config in configs):
            parser.error(f"--config {name}: the name is used twice")
        args = parser.parse_args([*argv, *shlex.split(flags)])
        configs.append(config_from_args(args, name))
    return configs


def check_config(parser: argparse.ArgumentParser, config: BenchConfig) -> None:
    """Reject flag combinations that cannot run, naming the configuration and the flag."""
    where = f"configuration {config.name}: " if config.name != "run" else ""
    if config.input == "real" and not config.data:
        parser.error(f"{where}--input real needs --data DIR")
    if config.mode == "keras" and config.np != 1:
        parser.error(f"{where}--mode keras runs one process; use --np 1 or --mode hvdmri/mwms")
    if config.fp16_allreduce and config.mode != "hvdmri":
        parser.error(f"{where}--fp16-allreduce applies to --mode hvdmri only")
    if config.cycle_time_ms is not None and config.mode != "hvdmri":
        parser.error(f"{where}--cycle-time-ms applies to --mode hvdmri only")


def worker_argv(config: BenchConfig) -> list[str]:
    """Return the flags that make a child process run exactly this configuration."""
    argv = ["--mode", config.mode, "--input", config.input, "--np", str(config.np),
            "--image-size", str(config.image_size), "--batch-size", str(config.batch_size),
            "--precision", config.precision, "--warmup-steps", str(config.warmup_steps),
            "--steps", str(config.steps), "--breakdown-steps", str(config.breakdown_steps),
            "--seed", str(config.seed)]
    if config.data:
        argv += ["--data", config.data]
    if config.threads:
        argv += ["--threads", str(config.threads)]
    if config.fp16_allreduce:
        argv.append("--fp16-allreduce")
    if config.augment:
        argv.append("--augment")
    if config.no_fused_relu:
        argv.append("--no-fused-relu")
    if config.cycle_time_ms is not None:
        argv += ["--cycle-time-ms", str(config.cycle_time_ms)]
    return argv
