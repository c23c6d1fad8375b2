"""Per-worker measurements: step end times, peak resident memory, machine load."""

from __future__ import annotations

import os
import resource
import statistics
import time

import tensorflow as tf


class StepTimer(tf.keras.callbacks.Callback):
    """Record the wall-clock time at the end of every training step.

    On CPU a Keras step returns only after its ops have run, so the time between
    two step ends is the whole step: input, forward, backward, allreduce, update.
    """

    def __init__(self):
        super().__init__()
        self.step_ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.step_ends.append(time.perf_counter())


def step_summary(step_ends: list[float], warmup_steps: int, batch_size: int) -> dict:
    """Summarise the timed steps: those after the first warmup_steps."""
    timed = step_ends[warmup_steps - 1:]
    durations = [later - earlier for earlier, later in zip(timed, timed[1:])]
    window = timed[-1] - timed[0]
    return {
        "timed_steps": len(durations),
        "step_s": statistics.median(durations),
        "step_s_min": min(durations),
        "step_s_max": max(durations),
        "images_per_s": batch_size * len(durations) / window,
    }


def peak_rss_gib() -> float:
    """Return this process's peak resident set size so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages, rounded for the JSON line."""
    return [round(value, 2) for value in os.getloadavg()]


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
