"""What rank 0 records after each epoch, and what a resume accepts.

RunRecorder is driven directly with hand-made epoch logs on a tiny Keras model, so
the best-epoch rule, the handling of a diverged epoch and the resume checks are
shown without training ResNet-50.
"""

import csv
import math

import numpy as np
import pytest
import tensorflow as tf

from hvdmri import runs
from hvdmri.callbacks import RunRecorder, StopOnDivergence, diverged
from hvdmri.config import TrainConfig
from hvdmri.distributed import UsageError
from hvdmri.resume import find_resume_point


def tiny_model() -> tf.keras.Model:
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


def record(run_dir, epochs: list[dict], model=None) -> tuple[RunRecorder, tf.keras.Model]:
    """Feed RunRecorder one logs dict per epoch; each epoch gets distinct weights."""
    model = model or tiny_model()
    recorder = RunRecorder(run_dir, "scratch", history=[], best={})
    recorder.set_model(model)
    for epoch, logs in enumerate(epochs):
        kernel = model.layers[-1].kernel
        kernel.assign(np.full(kernel.shape, float(epoch + 1), np.float32))
        recorder.on_epoch_end(epoch, dict(logs))
    return recorder, model


def saved_kernel_value(path) -> float:
    model = tiny_model()
    model.load_weights(str(path))
    return float(model.layers[-1].kernel.numpy()[0, 0])


def history_rows(run_dir) -> list[dict]:
    with open(run_dir / runs.HISTORY_FILE) as handle:
        return list(csv.DictReader(handle))


def test_equal_accuracy_goes_to_the_lower_validation_loss(tmp_path):
    recorder, _ = record(tmp_path, [
        {"loss": 1.0, "val_loss": 8.9, "val_accuracy": 0.5},
        {"loss": 0.8, "val_loss": 0.7, "val_accuracy": 0.5},
        {"loss": 0.7, "val_loss": 0.9, "val_accuracy": 0.5},
    ])
    assert recorder.best["epoch"] == 2
    assert saved_kernel_value(tmp_path / "checkpoints" / "best.weights.h5") == 2.0
    assert saved_kernel_value(tmp_path / "checkpoints" / "last.weights.h5") == 3.0


def test_higher_accuracy_wins_over_lower_loss(tmp_path):
    recorder, _ = record(tmp_path, [
        {"loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.6},
        {"loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.7},
    ])
    assert recorder.best["epoch"] == 2


def test_without_validation_the_latest_epoch_is_best(tmp_path):
    recorder, _ = record(tmp_path, [{"loss": 1.0}, {"loss": 0.8}, {"loss": 0.6}])
    assert recorder.best["epoch"] == 3
    assert saved_kernel_value(tmp_path / "checkpoints" / "best.weights.h5") == 3.0


def test_diverged_epoch_is_recorded_but_never_checkpointed(tmp_path):
    recorder, _ = record(tmp_path, [
        {"loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.4},
        {"loss": math.nan, "val_loss": math.nan, "val_accuracy": 0.25},
    ])
    state = runs.read_json(tmp_path / "checkpoints" / "state.json")
    assert state["last_epoch"] == 1
    assert recorder.best["epoch"] == 1
    assert saved_kernel_value(tmp_path / "checkpoints" / "last.weights.h5") == 1.0
    rows = history_rows(tmp_path)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[1]["loss"] == "nan"


@pytest.mark.parametrize("logs, expected", [
    ({"loss": 0.5, "val_loss": 0.4}, False),
    ({"loss": 0.5}, False),
    ({"loss": math.nan, "val_loss": 0.4}, True),
    ({"loss": 0.5, "val_loss": math.inf}, True),
    ({}, True),
])
def test_diverged(logs, expected):
    assert diverged(logs) is expected


def test_stop_on_divergence_stops_after_the_epoch():
    model = tiny_model()
    stop = StopOnDivergence()
    stop.set_model(model)
    stop.on_epoch_end(0, {"loss": 0.3})
    assert not model.stop_training
    assert stop.epoch is None
    stop.on_epoch_end(1, {"loss": math.inf})
    assert model.stop_training
    assert stop.epoch == 2


def interrupted_run(run_dir, config: TrainConfig) -> None:
    """Write what an interrupted run leaves behind: config, state and a last checkpoint."""
    checkpoints = run_dir / runs.CHECKPOINT_DIR
    checkpoints.mkdir(parents=True)
    runs.write_json(run_dir / runs.CONFIG_FILE, {**config.to_dict(), "world_size": 2})
    runs.write_json(checkpoints / "state.json", {"last_epoch": 1, "phase": "scratch", "best": {}})
    tiny_model().save_weights(str(checkpoints / "last.weights.h5"))


@pytest.mark.parametrize("change, flag", [
    ({"scratch_lr": 5e-4}, "--scratch-lr 0.001 -> 0.0005"),
    ({"batch_size": 32}, "--batch-size 16 -> 32"),
    ({"data": "/other/Training"}, "--data /srv/Training -> /other/Training"),
    ({"augment": False}, "--no-augment not given -> given"),
    ({"warmup_epochs": 0.0}, "--warmup-epochs"),
])
def test_resume_refuses_changed_training_flags(tmp_path, change, flag):
    original = TrainConfig(data="/srv/Training", weights="none")
    interrupted_run(tmp_path, original)
    changed = TrainConfig(**{**original.to_dict(), **change})
    with pytest.raises(UsageError, match="different settings") as raised:
        find_resume_point(tmp_path, changed.to_dict())
    assert flag in str(raised.value)


def test_resume_accepts_changed_runtime_flags(tmp_path):
    original = TrainConfig(data="/srv/Training", weights="none")
    interrupted_run(tmp_path, original)
    changed = TrainConfig(**{**original.to_dict(), "threads": 3, "precision": "float32",
                             "fp16_allreduce": True})
    point = find_resume_point(tmp_path, changed.to_dict())
    assert point is not None
    assert point.epoch == 1
    assert point.world_size == 2
