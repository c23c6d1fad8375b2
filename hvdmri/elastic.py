"""Elastic training: keep training when a worker is lost, take it back when it returns.

    horovodrun --gloo -np 3 --min-np 2 --max-np 4 \\
        --host-discovery-script "launch/discover_hosts.sh hosts.txt" \\
        python -m hvdmri.train --elastic --data Training --run-dir /shared/runs/resnet50

Horovod's elastic driver starts one worker per slot that the discovery script lists.
When a worker dies, or a host leaves or joins the list, Horovod re-forms the ring
(a reset) and calls the wrapped training function again on every worker. That function
continues from a TrainingState, which every worker commits at each epoch end. The state
contains the plan rank 0 made (file list, split, run folder), the number of finished
epochs, the history and best epoch, and a copy of the weights and the optimizer state.
After a failure the workers roll back to the last commit and repeat the unfinished
epoch. Shards, steps per epoch and the scaled learning rate follow the new world size.
"""

from __future__ import annotations

import copy
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf
from horovod.common.elastic import State

from hvdmri.config import TrainConfig
from hvdmri.distributed import UsageError, Workers, get_logger, run_on_chief, setup_logging

# The committed fields that a rollback restores and a reset sends to every worker.
COMMITTED_FIELDS = ("epoch", "history", "best", "optimizer_phase")


@dataclass(frozen=True)
class PhaseSetup:
    """The phase that the next epoch belongs to, compiled for the current world size."""

    number: int
    first_epoch: int
    end_epoch: int
    scaled_lr: float
    trainable_layers: int


class TrainingState(State):
    """Everything a reset restores, and everything a worker that joins late receives.

    Horovod's KerasState does not fit this trainer, for three reasons. It keeps one
    optimizer for the whole run, but each phase here compiles a new one over other
    trainable layers. Its sync broadcasts the variables before a joining worker can
    know the phase, and so which optimizer variables to build. Its saved copy of plain
    Python fields shares the lists that training appends to, so a rollback would keep
    an uncommitted history row.
    """

    def __init__(self, config: TrainConfig, phases: list, precision: str):
        self.config = config
        self.phases = phases
        self.precision = precision
        self.plan: dict | None = None  # set once on every rank, never rolled back
        self.model: tf.keras.Model | None = None
        self.epoch = 0  # epochs finished; training continues with epoch + 1
        self.history: list[dict] = []
        self.best: dict = {}
        self.optimizer_phase: int | None = None  # phase whose optimizer state the snapshot contains
        self._committed: dict = {}
        self._model_values: list[np.ndarray] = []
        self._optimizer_values: list[np.ndarray] = []
        super().__init__(bcast_object=hvd_tf.broadcast_object, get_rank=hvd.rank)
        self._committed = copy.deepcopy(self._fields())

    @property
    def total_epochs(self) -> int:
        return sum(phase.epochs for phase in self.phases)

    def save(self):
        # RunRecorder appends the history on rank 0 only. The other ranks take rank 0's
        # copy here, so whichever worker is rank 0 after a failure continues the same history.
        history, best = hvd_tf.broadcast_object((self.history, self.best), root_rank=0, name="elastic.history")
        if hvd.rank() != 0:
            self.history, self.best = history, best
        self._committed = copy.deepcopy(self._fields())
        self._snapshot_variables()

    def restore(self):
        if self.model is not None and self._model_values:
            for variable, value in zip(self.model.variables, self._model_values):
                variable.assign(value)
        self._set_fields(copy.deepcopy(self._committed))

    def sync(self):
        """Give every worker rank 0's committed state, building the model on a worker that has none."""
        self._committed, self.plan = hvd_tf.broadcast_object((self._committed, self.plan), root_rank=0,
                                                          name="elastic.sync")
        self._set_fields(copy.deepcopy(self._committed))
        if self.plan is None:
            # The first start: rank 0 makes the plan inside the training function.
            return
        if self.model is None:
            # Random weights: the broadcast below replaces them all.
            self.model = build_plan_model(self.config, self.plan, weights=None)
        variables = list(self.model.variables)
        if self.epoch < self.total_epochs:
            # Every rank compiles the same phase and builds its optimizer in the same
            # case, so the variable lists match for the broadcast.
            self.compile_phase()
            variables += list(self.model.optimizer.variables)
        hvd_tf.broadcast_variables(variables, root_rank=0)
        self._snapshot_variables()

    def compile_phase(self) -> PhaseSetup:
        """Compile the model for the phase of the next epoch and load the committed optimizer state.

        The learning rate is scaled by the current world size. A phase that already ran
        some epochs continues from the committed Adam moments and step count.
        """
        from hvdmri.model import set_trainable

        number, first_epoch = phase_at(self.phases, self.epoch)
        phase = self.phases[number]
        trainable = set_trainable(self.model, phase.train_from, phase.freeze_batchnorm)
        scaled_lr = phase.lr * hvd.size()
        compression = hvd.Compression.fp16 if self.config.fp16_allreduce else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(scaled_lr), compression=compression)
        self.model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        if self.optimizer_phase == number:
            # Keras creates the Adam moments on the first step; building them now lets
            # the committed values in before that step.
            optimizer.build(self.model.trainable_variables)
            if len(self._optimizer_values) == len(optimizer.variables):
                for variable, value in zip(optimizer.variables, self._optimizer_values):
                    variable.assign(value)
        return PhaseSetup(number, first_epoch, first_epoch + phase.epochs, scaled_lr, trainable)

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in COMMITTED_FIELDS}

    def _set_fields(self, values: dict) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def _snapshot_variables(self) -> None:
        if self.model is None:
            return
        self._model_values = [variable.numpy() for variable in self.model.variables]
        optimizer = getattr(self.model, "optimizer", None)
        built = optimizer is not None and getattr(optimizer, "_built", False)
        self._optimizer_values = [variable.numpy() for variable in optimizer.variables] if built else []


class CommitAtEpochEnd(tf.keras.callbacks.Callback):
    """Every rank: count the finished epoch and commit the state (the last callback of an epoch).

    Horovod's UpdateEpochStateCallback counts epochs from the start of each fit() and
    so would count twice with the initial_epoch that the learning-rate schedules need.
    Its CommitStateCallback commits after batches too, and a mid-epoch commit would
    need a batch-level resume, which does not fit shards that change with the world size.
    """

    def __init__(self, state: TrainingState, phase_number: int):
        super().__init__()
        self.state = state
        self.phase_number = phase_number

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch = epoch + 1
        self.state.optimizer_phase = self.phase_number
        # Also where a worker learns that hosts were added or removed: commit()
        # raises HostsUpdatedInterrupt on every rank at once.
        self.state.commit()


def phase_at(phases: list, epoch: int) -> tuple[int, int]:
    """Return the index and first epoch (0-based) of the phase that contains epoch."""
    first = 0
    for number, phase in enumerate(phases):
        if epoch < first + phase.epochs:
            return number, first
        first += phase.epochs
    raise ValueError(f"epoch {epoch} is past the last phase ({first} epochs in all)")


def check_elastic_flags(config: TrainConfig) -> None:
    """Reject flags whose per-rank files would be read by another worker after a reset."""
    for flag, field in (("--cache-dir", "cache_dir"), ("--feature-cache", "feature_cache")):
        if getattr(config, field, None):
            raise UsageError(f"{flag} cannot be used with --elastic: its files belong to a rank, and ranks "
                             f"change when workers leave or join; drop {flag}")


def build_plan_model(config: TrainConfig, plan: dict, weights: str | None) -> tf.keras.Model:
    from hvdmri.model import build_model, set_batchnorm_momentum

    model = build_model(len(plan["class_names"]), config.image_size, weights,
                        fused_relu=False if config.no_fused_relu else None)
    if config.weights == "none":
        set_batchnorm_momentum(model, config.scratch_bn_momentum)
    return model


def current_workers() -> Workers:
    """Return this process's place in the current ring (it changes at every reset)."""
    return Workers(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())


def train_elastic(config: TrainConfig, phases: list) -> Path:
    """Train under horovodrun's elastic driver; return the run folder.

    Call after hvd.init() and before any collective operation: a worker that joins a
    running job must meet the others in TrainingState.sync, not in a broadcast of
    its own.
    """
    from hvdmri.train import resolve_precision

    check_elastic_flags(config)
    # TODO: the clean stop at a step boundary is not wired into elastic training, so a
    # caught SIGINT or SIGTERM would be recorded and never acted on. Restore Python's
    # defaults, which end the worker at once; the last epoch-end checkpoint remains.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    precision = resolve_precision(config.precision)
    tf.keras.mixed_precision.set_global_policy(precision)
    get_logger().info("precision: %s; elastic training", precision)
    tf.keras.utils.set_random_seed(config.seed)
    state = TrainingState(config, phases, precision)
    state.register_reset_callbacks([lambda: log_reset(state)])
    run_dir = hvd.elastic.run(train_on_current_workers)(state)
    if run_dir is None:
        # Horovod 0.28.1's elastic wrapper swallows a TensorFlow UnknownError that does
        # not name a Horovod operation and returns None in place of the result.
        raise RuntimeError("elastic training ended without finishing the run: a TensorFlow error was "
                           "swallowed by Horovod's elastic wrapper; rerun with the same --run-dir to resume")
    return run_dir


def log_reset(state: TrainingState) -> None:
    setup_logging(hvd.rank())
    get_logger().info("elastic: the workers changed, world_size=%d now; continuing after epoch %d, the "
                      "last committed one", hvd.size(), state.epoch)


def start_run(state: TrainingState, workers: Workers) -> None:
    """First start: make the plan on rank 0, build the model, load a checkpoint, commit."""
    from hvdmri import runs
    from hvdmri.model import resolve_weights
    from hvdmri.train import check_data_on_every_rank, prepare_run, restore_checkpoint

    config = state.config
    plan = run_on_chief(workers, lambda: prepare_run(config, workers.world_size), "prepare_run")
    check_data_on_every_rank(workers, config, plan)
    run_dir = Path(plan["run_dir"])
    if workers.is_chief:
        runs.write_json(run_dir / runs.CONFIG_FILE, {
            **replace(config, run_dir=str(run_dir)).to_dict(), "data_root": plan["data_root"],
            "world_size": workers.world_size, "class_names": list(plan["class_names"]),
            "train_images": len(plan["train_idx"]), "val_images": len(plan["val_idx"]),
            "skipped_files": plan["skipped"], "duplicate_groups": plan["duplicate_groups"],
            "excluded_duplicates": plan["excluded_duplicates"],
        })
    for relative, reason in plan["skipped"]:
        get_logger().warning("skipped %s: %s", relative, reason)

    weights = resolve_weights(config.weights)
    if weights == "imagenet":
        # Only rank 0 downloads; the others then read the cached file.
        run_on_chief(workers, lambda: build_plan_model(config, plan, "imagenet") and None, "download_weights")
    state.model = build_plan_model(config, plan, weights)
    state.plan = plan

    resume = plan["resume"]
    if resume:
        # NOTE: a run stopped inside an epoch resumes at the start of that epoch here,
        # from last.weights.h5: the steps done before the stop are trained again.
        state.epoch, state.history, state.best = resume["epoch"], resume["history"], resume["best"]
        get_logger().info("resuming %s after epoch %d of %d", run_dir, state.epoch, state.total_epochs)
    if state.epoch < state.total_epochs:
        number, first_epoch = phase_at(state.phases, state.epoch)
        # Within a phase the checkpoint's optimizer state continues; a new phase starts fresh.
        state.optimizer_phase = number if state.epoch > first_epoch else None
        state.compile_phase()
    if resume:
        restore_checkpoint(workers, state.model, run_dir, with_optimizer=state.optimizer_phase is not None)
    elif workers.world_size > 1:
        hvd_tf.broadcast_variables(state.model.variables, root_rank=0)
    state.commit()


def train_on_current_workers(state: TrainingState) -> Path:
    """Train the remaining epochs with the workers of this ring, then finish the run.

    Horovod calls this again after every reset, with the state rolled back to the last
    commit (after a failure) or just committed (after hosts were added or removed).
    """
    from hvdmri.callbacks import (AverageBatchNormStatistics, EpochLogger, GlobalValidation, RunRecorder,
                                  StopOnDivergence, learning_rate_schedule)
    from hvdmri.data.pipeline import DecodeFailureReport, DecodeFailures, make_dataset
    from hvdmri.data.split import shard
    from hvdmri.train import RankShards, finish_run, resolve_data_root

    workers = current_workers()
    setup_logging(workers.rank)
    log = get_logger()
    if state.plan is None:
        start_run(state, workers)
    config, plan, phases = state.config, state.plan, state.phases
    run_dir = Path(plan["run_dir"])
    # Every node has the data at the same path; the phantom set is generated where missing.
    data_root = Path(plan["data_root"]) if config.data else resolve_data_root(config)

    shards = RankShards.of(plan, data_root, workers, config.batch_size)
    steps = shards.steps
    decode_failures = DecodeFailures()
    train_ds = make_dataset(shards.train_paths, shards.train_labels, config.image_size,
                            config.batch_size, training=True, seed=config.seed + workers.rank,
                            augment=config.augment, failures=decode_failures)
    val_ds = make_dataset(shards.val_paths, shards.val_labels, config.image_size,
                          config.batch_size, training=False, failures=decode_failures)
    log.info("elastic: world_size=%d from epoch %d of %d: at most %d training images per worker, global "
             "batch %d, %d steps per epoch", workers.world_size, state.epoch + 1, state.total_epochs,
             len(shard(np.asarray(plan["train_idx"]), 0, workers.world_size)),
             workers.world_size * config.batch_size, steps)

    started = time.time()
    divergence = StopOnDivergence()
    while state.epoch < state.total_epochs:
        setup = state.compile_phase()
        phase = phases[setup.number]
        log.info("phase %d/%d '%s': epochs %d-%d, %d trainable base layers, lr %.2e (%.2e x %d workers)",
                 setup.number + 1, len(phases), phase.name, state.epoch + 1, setup.end_epoch,
                 setup.trainable_layers, setup.scaled_lr, phase.lr, workers.world_size)
        callbacks = [
            # Horovod: average the training metrics over ranks.
            hvd.callbacks.MetricAverageCallback(),
            AverageBatchNormStatistics(),
            GlobalValidation(val_ds),
            divergence,
            DecodeFailureReport(decode_failures),
        ]
        callbacks += learning_rate_schedule(setup.scaled_lr, setup.first_epoch, setup.end_epoch,
                                            config.warmup_epochs if setup.number == 0 else 0, steps)
        if workers.is_chief:
            callbacks += [
                EpochLogger(state.total_epochs, phase.name, steps, workers.world_size * config.batch_size),
                RunRecorder(run_dir, phase.name, state.history, state.best, keep=config.keep_checkpoints),
            ]
        # Last, so the commit contains the history row and checkpoint of this epoch.
        callbacks.append(CommitAtEpochEnd(state, setup.number))
        state.model.fit(train_ds, initial_epoch=state.epoch, epochs=setup.end_epoch, steps_per_epoch=steps,
                        callbacks=callbacks, verbose=0)
        if divergence.epoch:
            raise UsageError(f"training diverged in epoch {divergence.epoch} (loss {divergence.loss}): lower "
                             f"the learning rate and train into a new --run-dir")

    log.info("training finished in %.1f min on %d workers", (time.time() - started) / 60, workers.world_size)
    finish_run(workers, state.model, replace(config, run_dir=str(run_dir)), plan, run_dir, state.best,
               state.precision)
    return run_dir
