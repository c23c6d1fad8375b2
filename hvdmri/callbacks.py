"""Keras callbacks for Horovod training: global validation, logging, history, checkpoints.

Order matters: GlobalValidation must run before the rank-0 callbacks that read
val_loss and val_accuracy, and Horovod's MetricAverageCallback before any
callback that logs training metrics.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
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
                 interval: float = 30.0):
        super().__init__()
        self.total_epochs = total_epochs
        self.phase = phase
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.interval = interval
        self.step_lines = not sys.stdout.isatty()
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

    checkpoints/last.weights.h5 always contains the latest epoch; best.weights.h5 the
    epoch with the highest val_accuracy so far.
    """

    def __init__(self, run_dir: Path, phase: str, history: list[dict], best: dict):
        super().__init__()
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
        checkpoints = self.run_dir / runs.CHECKPOINT_DIR
        last = checkpoints / "last.weights.h5"
        with runs.atomic_path(last) as temporary:
            self.model.save_weights(str(temporary))
        val_accuracy = row["val_accuracy"]
        improved = not math.isnan(val_accuracy) and val_accuracy > self.best.get("val_accuracy", -1.0)
        if improved or not (checkpoints / "best.weights.h5").exists():
            with runs.atomic_path(checkpoints / "best.weights.h5") as temporary:
                shutil.copyfile(last, temporary)
            self.best.update(epoch=epoch + 1, phase=self.phase,
                             val_accuracy=val_accuracy if not math.isnan(val_accuracy) else -1.0)
        runs.write_json(checkpoints / "state.json", {
            "last_epoch": epoch + 1, "phase": self.phase, "best": self.best,
        })
        self.history.append(row)
        runs.write_text(self.run_dir / runs.HISTORY_FILE, history_csv(self.history))


def history_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                         for key, value in row.items()})
    return buffer.getvalue()


def cosine_multiplier(start_epoch: float, end_epoch: float, floor: float = 0.0):
    """Return fn(epoch) falling from 1 at start_epoch to floor at end_epoch on a half cosine."""
    span = max(end_epoch - start_epoch, 1e-9)

    def multiplier(epoch: float) -> float:
        progress = min(max((epoch - start_epoch) / span, 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * progress))

    return multiplier
