"""Clean stops: a signal or a STOP file ends training at the next step with a step checkpoint.

SIGTERM and SIGINT (Ctrl-C) reaching any rank, or a file RUN_DIR/STOP that rank 0
finds, request a stop. After every training step each rank puts its request into
one small allreduce (maximum), so all ranks stop after the same step and none is
left waiting in a gradient allreduce. Rank 0 then writes checkpoints/stopped.weights.h5
(weights and optimizer state) with the partial epoch's metric sums, every rank
exits with STOPPED_EXIT_CODE, and rerunning the same command runs the remaining
steps of that epoch before going on.

horovodrun 0.28.1 answers its own SIGINT or SIGTERM by sending SIGTERM to every
worker and killing them 5 s later (GRACEFUL_TERMINATION_TIME_S in
horovod/runner/common/util/safe_shell_exec.py). A step and the checkpoint must fit
in those 5 s; `touch RUN_DIR/STOP` has no such limit, which is why launch/slurm.sbatch
uses it.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import tensorflow as tf

from hvdmri import runs
from hvdmri.cli import run_command
from hvdmri.distributed import env_rank, get_logger

# EX_TEMPFAIL in sysexits.h: the run is incomplete, and running it again continues it.
STOPPED_EXIT_CODE = 75
# EX_IOERR in sysexits.h.
CHECKPOINT_WRITE_EXIT_CODE = 74
STOP_FILE = "STOP"
STOPPED_CHECKPOINT = "stopped.weights.h5"
# Allreduce codes: the maximum wins when ranks saw different requests.
REASONS = {1: "SIGINT", 2: "SIGTERM", 3: f"the {STOP_FILE} file"}


@dataclass
class TrainingStopped(Exception):
    """All ranks stopped after `step` steps of the 0-based `epoch` because of `reason`."""

    reason: str
    epoch: int
    step: int
    metric_sums: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"stopped by {self.reason} in epoch {self.epoch + 1} after step {self.step}; "
                f"rerun the same command to resume")


class StopRequest:
    """The stop this process was asked for: set by the signal handlers, read at each step."""

    def __init__(self):
        self.code = 0

    def install(self) -> None:
        """Catch SIGINT and SIGTERM; a second signal of the same kind ends the process at once."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.code:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.code = next(code for code, reason in REASONS.items() if reason == name)
        get_logger().info("%s received: stopping after the current step (send it again to stop at once)",
                          name)


def remove_leftovers(run_dir: Path) -> None:
    """Rank 0, before training: delete what an earlier stop or kill left behind.

    A STOP file would stop the rerun at its first step, and a process killed while
    writing a checkpoint leaves its temporary file (see runs.atomic_path).
    """
    stop_file = Path(run_dir) / STOP_FILE
    if stop_file.exists():
        stop_file.unlink()
        get_logger().info("removed %s left by an earlier stop", stop_file)
    for temporary in (Path(run_dir) / runs.CHECKPOINT_DIR).glob(".*.tmp*"):
        temporary.unlink(missing_ok=True)
        get_logger().info("removed %s, a checkpoint whose writing was interrupted", temporary)


class StopAtStepBoundary(tf.keras.callbacks.Callback):
    """Every rank: agree after each step whether any rank was asked to stop; if so, raise.

    Raises:
        TrainingStopped: on every rank after the same step, carrying the partial
            epoch's metric sums averaged over ranks.
    """

    def __init__(self, request: StopRequest, run_dir: Path, is_chief: bool, world_size: int):
        super().__init__()
        self.request = request
        self.stop_file = Path(run_dir) / STOP_FILE
        self.is_chief = is_chief
        self.world_size = world_size
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        code = self.request.code
        if not code and self.is_chief and self.stop_file.exists():
            code = self.request.code = 3
        if self.world_size > 1:
            import horovod.tensorflow as hvd

            # Horovod: one int32 per step; every rank must make this call after every step.
            # TODO: this waits for the next Horovod cycle, about 10 ms per step. Checking every
            # few steps, or sending the flag with the gradient allreduce, would save most of it.
            code = int(hvd.allreduce(tf.constant(code, tf.int32), op=hvd.Max, name="stop_request"))
        if code:
            raise TrainingStopped(REASONS[code], self.epoch, batch + 1, self._metric_sums())

    def _metric_sums(self) -> dict:
        """Return each metric's state variables (totals and counts), averaged over ranks."""
        sums = {}
        for metric in self.model.metrics:
            values = [variable.numpy().astype("float64") for variable in metric.variables]
            if self.world_size > 1:
                import horovod.tensorflow as hvd

                values = [hvd.allreduce(value, op=hvd.Average, name=f"stop_metric.{metric.name}.{i}").numpy()
                          for i, value in enumerate(values)]
            sums[metric.name] = [value.tolist() for value in values]
        return sums


def save_stop_checkpoint(model, run_dir: Path, stop: TrainingStopped, phase: str, best: dict,
                         steps_per_epoch: int) -> None:
    """Rank 0: write the weights and optimizer state after the stop step, then record it in state.json.

    The per-epoch checkpoint (last.weights.h5) stays as it was, so a failed write here
    still leaves the run resumable from the last completed epoch.
    """
    checkpoints = Path(run_dir) / runs.CHECKPOINT_DIR
    with runs.atomic_path(checkpoints / STOPPED_CHECKPOINT) as temporary:
        model.save_weights(str(temporary))
    state_path = checkpoints / "state.json"
    state = runs.read_json(state_path) if state_path.is_file() else {"last_epoch": 0, "phase": phase,
                                                                     "best": best}
    state["stopped"] = {"epoch": stop.epoch + 1, "step": stop.step, "steps_per_epoch": steps_per_epoch,
                        "phase": phase, "reason": stop.reason, "metric_sums": stop.metric_sums}
    runs.write_json(state_path, state)
    stop_file = Path(run_dir) / STOP_FILE
    if stop_file.exists():
        stop_file.unlink()


def finish_stop(workers, model, run_dir: Path, stop: TrainingStopped, phase: str, best: dict,
                steps_per_epoch: int) -> None:
    """Write the step checkpoint on rank 0 while every other rank waits for it.

    horovodrun ends the whole job as soon as one worker exits with a non-zero
    status, so no rank may exit before the checkpoint is complete.

    Raises:
        runs.CheckpointWriteError: on every rank, when rank 0 could not write the checkpoint.
    """
    error: OSError | None = None
    if workers.is_chief:
        try:
            save_stop_checkpoint(model, run_dir, stop, phase, best, steps_per_epoch)
        except OSError as caught:
            error = caught
    failure = f"{error}" if error else None
    if workers.world_size > 1:
        import horovod.tensorflow as hvd

        failure = hvd.broadcast_object(failure, root_rank=0, name="stop_checkpoint")
    if failure:
        raise runs.CheckpointWriteError(Path(run_dir) / runs.CHECKPOINT_DIR, error or OSError(failure))


class ContinueEpochMetrics(tf.keras.callbacks.Callback):
    """Add a stopped epoch's metric sums to the resumed epoch, so its history row covers every step.

    NOTE: this assumes metrics whose state is a sum and a count, as in Keras' Mean and
    MeanMetricWrapper, which loss and accuracy use. Adding any other state is wrong.
    """

    def __init__(self, metric_sums: dict):
        super().__init__()
        self.metric_sums = metric_sums
        self.applied = False

    def on_train_batch_end(self, batch, logs=None):
        # Keras resets the metrics at the epoch start and builds the compiled ones in
        # the first step, so the sums are added after it.
        if self.applied:
            return
        for metric in self.model.metrics:
            for variable, value in zip(metric.variables, self.metric_sums.get(metric.name, [])):
                variable.assign_add(tf.cast(value, variable.dtype))
        self.applied = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # The logs of a 1-step epoch come from before the sums were added.
        for metric in self.model.metrics:
            result = metric.result()
            if isinstance(result, dict):
                logs.update({key: float(value) for key, value in result.items()})
            else:
                logs[metric.name] = float(result)


class ShiftedBatches(tf.keras.callbacks.Callback):
    """Run callbacks in a fit() that starts `offset` steps into an epoch, with their usual step numbers.

    Learning-rate schedules compute the fractional epoch from the step number, and
    the stop callback reports it.
    """

    def __init__(self, callbacks: list, offset: int):
        super().__init__()
        self.callbacks = callbacks
        self.offset = offset

    def set_model(self, model):
        super().set_model(model)
        for callback in self.callbacks:
            callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for callback in self.callbacks:
            callback.set_params(params)

    def _forward(self, hook: str, *args):
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def on_train_begin(self, logs=None):
        self._forward("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._forward("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._forward("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._forward("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._forward("on_train_batch_begin", batch + self.offset, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._forward("on_train_batch_end", batch + self.offset, logs)


def resumed_step(step: int, steps_then: int | None, steps_now: int) -> int:
    """Return the step at which a stopped epoch continues when the steps per epoch have changed.

    With a different worker count an epoch has a different number of steps. The
    continuation keeps the fraction of the epoch already done, so the epoch still
    covers about one pass over the data. At least one step remains, and 0 means the
    epoch starts over from the stop checkpoint.
    """
    if not steps_then or steps_then == steps_now:
        return step
    return min(steps_now - 1, round(step * steps_now / steps_then))


def fit_rest_of_epoch(model, dataset, callbacks: list, epoch: int, step: int, steps: int, metric_sums: dict,
                      verbose: int) -> None:
    """Run the steps of the 0-based epoch after `step`, as the continuation of a stopped epoch.

    NOTE: the batches come from the start of a fresh pass over the shuffled data,
    not from where the stopped pass was. So within this epoch some images may be
    seen twice and others not at all, although the step count is exact.
    """
    get_logger().info("continuing epoch %d at step %d of %d", epoch + 1, step + 1, steps)
    model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps - step,
              callbacks=[ShiftedBatches([ContinueEpochMetrics(metric_sums), *callbacks], step)],
              verbose=verbose)


# Signals reach the process, not a run, so there is one request per process.
stop_request = StopRequest()


def run_stoppable(name: str, command: Callable[[], object]) -> int:
    """Run a training command with clean stops; return its exit code.

    0: finished. 2: bad input (UsageError). STOPPED_EXIT_CODE (75): stopped on request
    with a checkpoint. CHECKPOINT_WRITE_EXIT_CODE (74): a checkpoint could not be
    written, for example on a full disk.
    """
    stop_request.install()
    try:
        return run_command(name, command)
    except TrainingStopped as stop:
        get_logger().warning("%s", stop)
        # Tearing down TensorFlow and Horovod takes seconds (11 s measured on a busy
        # 2-core machine), and horovodrun kills workers 5 s after its own SIGTERM.
        # Everything written is already closed and fsynced by then.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOPPED_EXIT_CODE)
    except runs.CheckpointWriteError as error:
        if env_rank() == 0:
            print(f"{name}: error: {error}", file=sys.stderr)
        return CHECKPOINT_WRITE_EXIT_CODE


def measure_stop_check(repeats: int = 500) -> float:
    """Time the per-step stop allreduce on this job's ranks; log and return its median in ms.

        horovodrun --gloo -np 2 -H localhost:2 python -c \\
            "from hvdmri.stopping import measure_stop_check; measure_stop_check()"
    """
    import time

    from hvdmri.distributed import setup_horovod

    import horovod.tensorflow as hvd

    setup_horovod()
    for _ in range(20):  # warm-up: the first collectives set up Gloo's connections
        hvd.allreduce(tf.constant(0, tf.int32), op=hvd.Max, name="stop_request")
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        int(hvd.allreduce(tf.constant(0, tf.int32), op=hvd.Max, name="stop_request"))
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    median_ms = seconds[len(seconds) // 2] * 1e3
    get_logger().info("stop check: median %.2f ms, 90th percentile %.2f ms over %d allreduces on %d ranks",
                      median_ms, seconds[int(len(seconds) * 0.9)] * 1e3, repeats, hvd.size())
    return median_ms
