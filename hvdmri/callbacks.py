"""Keras callbacks for Horovod training: global validation, logging, history, checkpoints.

Order matters: GlobalValidation must run before the rank-0 callbacks that read
val_loss and val_accuracy, and Horovod's MetricAverageCallback before any
callback that logs training metrics.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdmri import runs
from hvdmri.distributed import allreduce_sum, get_logger


def global_mean(local_total: float, local_count: float, name: str) -> float:
    """Return sum(totals) / sum(counts) over all ranks.

    Averaging each rank's own mean would weight a rank holding 3 images like one
    holding 4; summing first gives the mean over all images.
    """
    total, count = allreduce_sum([local_total, local_count], name=name)
    return total / count if count else math.nan


class AverageBatchNormStatistics(tf.keras.callbacks.Callback):
    """Average BatchNormalization moving statistics over ranks at each epoch end.

    Horovod averages gradients, not the moving mean and variance, so each rank's
    statistics drift towards its own shard. Averaging them before validation and
    checkpointing makes every rank hold the same model: the validation score is
    then that of the saved model, not of a mix of per-rank models. The mean of the
    ranks' moving variances ignores the spread between their means, which is an
    approximation but small next to the variances themselves.
    """

    def on_epoch_end(self, epoch, logs=None):
        import horovod.tensorflow as hvd

        if hvd.size() == 1:
            return
        statistics = [weight for layer in self.model.layers
                      if isinstance(layer, tf.keras.layers.BatchNormalization)
                      for weight in (layer.moving_mean, layer.moving_variance)]
        # Sorted names give every rank the same collective order.
        for variable in sorted(statistics, key=lambda v: v.name):
            variable.assign(hvd.allreduce(variable, op=hvd.Average, name=f"bn_average.{variable.name}"))


class GlobalValidation(tf.keras.callbacks.Callback):
    """Evaluate each rank's validation shard and put the all-image means into the logs.

    The shards may be uneven and are not repeated, so every image is counted once;
    there is exactly one allreduce per epoch, which every rank reaches.
    """

    def __init__(self, dataset: tf.data.Dataset):
        super().__init__()
        self.dataset = dataset
        self._predict = None

    def on_epoch_end(self, epoch, logs=None):
        if self._predict is None:
            self._predict = tf.function(lambda images: self.model(images, training=False),
                                        reduce_retracing=True)
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for images, labels in self.dataset:
            probabilities = self._predict(images)
            losses = tf.keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            loss_sum += float(tf.reduce_sum(losses))
            predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            correct += float(tf.reduce_sum(tf.cast(predicted == labels, tf.float32)))
            count += int(labels.shape[0])
        total_loss, total_correct, total_count = allreduce_sum([loss_sum, correct, count],
                                                              name="global_validation")
        if logs is not None and total_count:
            logs["val_loss"] = total_loss / total_count
            logs["val_accuracy"] = total_correct / total_count


class EpochLogger(tf.keras.callbacks.Callback):
    """Rank 0: one line per epoch, and a step line every interval seconds when no TTY
    shows Keras' progress bar (horovodrun pipes the workers' output)."""

    def __init__(self, total_epochs: int, phase: str, steps_per_epoch: int, global_batch_size: int,
                 interval: float = 30.0, step_lines: bool | None = None):
        super().__init__()
        self.total_epochs = total_epochs
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.interval = interval
        self.step_lines = not sys.stdout.isatty() if step_lines is None else step_lines
        self._epoch_start = 0.0
        self._last_line = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._last_line = time.time()

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        if not self.step_lines or now - self._last_line < self.interval:
            return
        self._last_line = now
        elapsed = now - self._epoch_start
        done = batch + 1
        rate = done * self.global_batch_size / elapsed
        eta = (self.steps_per_epoch - done) * elapsed / done
        get_logger().info("  step %d/%d  loss %.4f  accuracy %.4f  %.1f images/s  eta %.0f s",
                          done, self.steps_per_epoch, (logs or {}).get("loss", math.nan),
                          (logs or {}).get("accuracy", math.nan), rate, eta)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.time() - self._epoch_start
        logs["seconds"] = seconds
        get_logger().info(
            "epoch %d/%d [%s]  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  "
            "lr %.2e  %.0f s (%.1f images/s)",
            epoch + 1, self.total_epochs, self.phase, logs.get("loss", math.nan),
            logs.get("accuracy", math.nan), logs.get("val_loss", math.nan),
            logs.get("val_accuracy", math.nan), float(self.model.optimizer.learning_rate),
            seconds, self.steps_per_epoch * self.global_batch_size / max(seconds, 1e-9),
        )


HISTORY_COLUMNS = ("epoch", "phase", "lr", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


class RunRecorder(tf.keras.callbacks.Callback):
    """Rank 0: after each epoch, rewrite history.csv and the checkpoints atomically.

    checkpoints/epoch-NNNN.weights.h5 contains epoch NNNN, and the newest `keep` of
    them are kept; last.weights.h5 always contains the latest epoch; best.weights.h5 the
    epoch with the highest val_accuracy so far, ties going to the lower val_loss (without
    a validation set, the latest epoch). An epoch whose loss is not finite is recorded in
    the history but never checkpointed, so a resume starts from the last sound weights.
    """

    def __init__(self, run_dir: Path, phase: str, history: list[dict], best: dict,
                 weights_model: tf.keras.Model | None = None, keep: int = 2):
        super().__init__()
        self.keep = keep  # epoch-numbered checkpoint files to keep
        # The model whose weights are checkpointed, when fit() trains only a part of
        # it (the head on stored features); None saves the model fit() trains.
        self.weights_model = weights_model
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.history = history  # shared across phases, so the CSV lists every epoch
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, "phase": self.phase,
               "lr": float(self.model.optimizer.learning_rate)}
        for key in HISTORY_COLUMNS[3:]:
            row[key] = float(logs.get(key, math.nan))

        # Checkpoint first, state next, history last: a crash between two writes
        # leaves the history behind the checkpoint, never ahead of it.
        if diverged(logs):
            self.history.append(row)
            runs.write_text(self.run_dir / runs.HISTORY_FILE, history_csv(self.history))
            return
        checkpoints = self.run_dir / runs.CHECKPOINT_DIR
        try:
            self.write_checkpoints(checkpoints, epoch + 1, row)
        except OSError as error:
            raise runs.CheckpointWriteError(checkpoints, error) from error
        self.history.append(row)
        try:
            runs.write_text(self.run_dir / runs.HISTORY_FILE, history_csv(self.history))
        except OSError as error:
            raise runs.CheckpointWriteError(self.run_dir, error) from error
        runs.prune_checkpoints(checkpoints, self.keep)

    def write_checkpoints(self, checkpoints: Path, epoch: int, row: dict) -> None:
        """Write the epoch's weights file, then point best, state.json and last at it.

        state.json names the file it belongs to, so a crash between two steps leaves
        a state that matches its checkpoint.
        """
        epoch_file = checkpoints / runs.epoch_checkpoint_name(epoch)
        with runs.atomic_path(epoch_file) as temporary:
            (self.weights_model or self.model).save_weights(str(temporary))
        if self.is_best(row):
            runs.link_or_copy(epoch_file, checkpoints / "best.weights.h5")
            self.best.clear()
            self.best.update(epoch=epoch, phase=self.phase, val_accuracy=row["val_accuracy"],
                             val_loss=row["val_loss"])
        runs.write_json(checkpoints / "state.json", {
            "last_epoch": epoch, "phase": self.phase, "best": self.best, "checkpoint": epoch_file.name,
        })
        runs.link_or_copy(epoch_file, checkpoints / "last.weights.h5")


    def is_best(self, row: dict) -> bool:
        if not self.best or math.isnan(row["val_accuracy"]):
            return True
        best_accuracy = self.best.get("val_accuracy")
        best_accuracy = -1.0 if best_accuracy is None or math.isnan(best_accuracy) else best_accuracy
        if row["val_accuracy"] != best_accuracy:
            return row["val_accuracy"] > best_accuracy
        best_loss = self.best.get("val_loss")
        return best_loss is None or math.isnan(best_loss) or row["val_loss"] < best_loss


def diverged(logs: dict) -> bool:
    """Return whether the epoch's training loss, or its validation loss when there is one, is not finite."""
    losses = [logs.get("loss", math.nan)] + ([logs["val_loss"]] if "val_loss" in logs else [])
    return not all(math.isfinite(float(value)) for value in losses)


class StopOnDivergence(tf.keras.callbacks.Callback):
    """Stop training after an epoch whose loss is not finite; remember that epoch.

    At epoch end every rank has the same averaged loss and global validation
    loss, so all ranks stop after the same epoch. Keras' TerminateOnNaN checks each
    rank's own batch loss, and a rank that stopped alone would hang the others.
    """

    def __init__(self):
        super().__init__()
        self.epoch: int | None = None  # 1-based epoch that diverged
        self.loss = math.nan

    def on_epoch_end(self, epoch, logs=None):
        if diverged(logs or {}):
            self.epoch, self.loss = epoch + 1, float((logs or {}).get("loss", math.nan))
            self.model.stop_training = True


def history_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                         for key, value in row.items()})
    return buffer.getvalue()


def learning_rate_schedule(scaled_lr: float, start_epoch: int, end_epoch: int, warmup_epochs: float,
                           steps_per_epoch: int) -> list[tf.keras.callbacks.Callback]:
    """Return Horovod's callbacks for one phase: an optional warm-up, then a cosine decay to 1%.

    Args:
        warmup_epochs: epochs over which the rate ramps from scaled_lr / world_size
            up to scaled_lr (0: none; capped at the phase's length).
    """
    import horovod.tensorflow.keras as hvd

    callbacks = []
    decay_start = start_epoch
    if warmup_epochs > 0:
        # Horovod: ramp up from the single-worker rate; a large scaled rate from
        # step one destabilises early training.
        warmup = min(warmup_epochs, end_epoch - start_epoch)
        callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=scaled_lr, warmup_epochs=warmup, steps_per_epoch=steps_per_epoch, verbose=0))
        decay_start = start_epoch + warmup
    callbacks.append(hvd.callbacks.LearningRateScheduleCallback(
        initial_lr=scaled_lr, multiplier=cosine_multiplier(decay_start, end_epoch, floor=0.01),
        start_epoch=decay_start, end_epoch=end_epoch, staircase=False, steps_per_epoch=steps_per_epoch))
    return callbacks


def cosine_multiplier(start_epoch: float, end_epoch: float, floor: float = 0.0):
    """Return fn(epoch) falling from 1 at start_epoch to floor at end_epoch on a half cosine."""
    span = max(end_epoch - start_epoch, 1e-9)

    def multiplier(epoch: float) -> float:
        progress = min(max((epoch - start_epoch) / span, 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * progress))

    return multiplier
