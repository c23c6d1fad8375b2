"""Horovod set-up and the rank-0 helpers every command shares.

Only rank 0 owns log handlers and progress bars; the other ranks get a logger
with a NullHandler, so library code can log without checking its rank.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

LOGGER_NAME = "hvdmri"
# How often Horovod's background thread looks for tensors ready to allreduce, in ms.
# Horovod's default is 1 ms. On CPU nodes that thread shares the cores with training.
# On a 2-core node 10 ms trained faster than 1 ms with one worker and with two, and as
# fast on an emulated 1 Gbit/s link (docs/BENCHMARKS.md, "Horovod's cycle time").
# The price is that each collective may wait up to one cycle.
CYCLE_TIME_MS = 10
# Every collective can wait up to one cycle, so a cycle of seconds would stall training.
MAX_CYCLE_TIME_MS = 1000
PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
T = TypeVar("T")


@dataclass(frozen=True)
class Workers:
    """This process's rank, local rank and the job's sizes."""

    rank: int
    local_rank: int
    world_size: int
    local_size: int

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """Return the rank horovodrun gave this process, before hvd.init() runs (0 when alone)."""
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def setup_horovod(threads: int | None = None) -> Workers:
    """Initialise Horovod and TensorFlow's thread pools; return this worker's place.

    Args:
        threads: intra-op threads for this worker. Defaults to the node's cores divided
            by the workers on the node, so several slots on one node never oversubscribe it.
    """
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    cycle_time = set_cycle_time()
    hvd.init()
    workers = Workers(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers.local_size)
    # Thread pools can only be sized before TensorFlow runs its first op.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    setup_logging(workers.rank)
    get_logger().info(
        "Horovod ready: world_size=%d, local_size=%d, %d intra-op threads per worker, cycle time %s",
        workers.world_size, workers.local_size, threads, cycle_time,
    )
    return workers


def set_cycle_time() -> str:
    """Set HOROVOD_CYCLE_TIME to hvdmri's default unless it is set, and return the value as log text.

    Horovod reads the variable once, in hvd.init(). horovodrun's --cycle-time-ms sets it,
    so that flag, or an exported value, wins over CYCLE_TIME_MS.

    Raises:
        UsageError: the variable is set but is not a plain decimal number of milliseconds
            from 0 to MAX_CYCLE_TIME_MS.
    """
    setting = os.environ.get("HOROVOD_CYCLE_TIME")
    if setting is None:
        if horovod_flag_on(os.environ.get("HOROVOD_AUTOTUNE", "")):
            # Horovod treats a cycle time from the environment as fixed, and its
            # autotuner (horovodrun --autotune) would then not tune it.
            return "tuned by Horovod's autotuner"
        os.environ["HOROVOD_CYCLE_TIME"] = str(CYCLE_TIME_MS)
        return f"{CYCLE_TIME_MS} ms"
    # Horovod parses the value with C's strtof and uses whatever prefix it reads, 0 for
    # text. Only plain decimals mean the same to strtof and to Python, so only they pass.
    if not PLAIN_DECIMAL.fullmatch(setting) or float(setting) > MAX_CYCLE_TIME_MS:
        raise UsageError(f"HOROVOD_CYCLE_TIME={setting!r} is not a number of milliseconds from 0 to "
                         f"{MAX_CYCLE_TIME_MS} written with digits and an optional decimal point; set one "
                         f"such as 10, or unset it to use hvdmri's {CYCLE_TIME_MS} ms")
    return f"{float(setting):g} ms"


def horovod_flag_on(value: str) -> bool:
    """Read a Horovod on/off variable as Horovod's operations.cc does: on when strtol(value) > 0."""
    leading = re.match(r"\s*[+-]?[0-9]+", value)
    return leading is not None and int(leading.group()) > 0


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """Give the hvdmri logger a console handler on rank 0 and a NullHandler elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
        # Keras warns through TensorFlow's Python logger (for example about slow
        # callbacks); one copy from rank 0 is enough.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def run_on_chief(workers: Workers, fn: Callable[[], T], what: str) -> T:
    """Run fn on rank 0 only and hand its result, or its failure, to every rank.

    A rank that failed alone would leave the others waiting forever in the next
    collective, so the outcome is broadcast and every rank raises the same error.
    """
    import horovod.tensorflow as hvd

    outcome: tuple[bool, Any] = (True, None)
    if workers.is_chief:
        try:
            outcome = (True, fn())
        except (UsageError, OSError, ValueError, RuntimeError) as error:
            outcome = (False, f"{error}")
    if workers.world_size > 1:
        outcome = hvd.broadcast_object(outcome, root_rank=0, name=f"run_on_chief.{what}")
    ok, value = outcome
    if not ok:
        raise UsageError(value)
    return value


def allreduce_sum(values: list[float], name: str) -> list[float]:
    """Sum a list of numbers over all ranks (identity when running alone)."""
    import horovod.tensorflow as hvd
    import numpy as np

    if hvd.size() == 1:
        return [float(v) for v in values]
    summed = hvd.allreduce(np.asarray(values, dtype=np.float64), op=hvd.Sum, name=name)
    return [float(v) for v in summed.numpy()]


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""
