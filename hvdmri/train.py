"""Train the ResNet-50 MRI classifier data-parallel with Horovod.

    horovodrun --gloo -np 4 -H node1:1,node2:1,node3:1,node4:1 python -m hvdmri.train --data Training
    horovodrun --gloo -np 2 -H localhost:2 python -m hvdmri.train --weights none --image-size 64
    python -m hvdmri.train --data Training            # one worker, no horovodrun

Rank 0 lists the data, splits it and creates the run folder, then hands the plan
to every rank; each rank trains on its own shard with the same number of steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hvdmri.config import TrainConfig, parse_args
from hvdmri.distributed import UsageError, Workers, get_logger, run_on_chief, setup_horovod


@dataclass(frozen=True)
class Phase:
    """One stage of transfer learning: which base layers train, for how long, how fast."""

    name: str
    epochs: int
    lr: float
    train_from: str | None  # first trainable ResNet-50 stage; None: base frozen
    freeze_batchnorm: bool


def plan_phases(config: TrainConfig) -> list[Phase]:
    """Return the phases with at least one epoch, in order."""
    if config.weights == "none":
        phases = [Phase("scratch", config.scratch_epochs, config.scratch_lr, "conv1", False)]
    else:
        phases = [
            Phase("head", config.head_epochs, config.head_lr, None, True),
            Phase("finetune", config.finetune_epochs, config.finetune_lr, config.finetune_from, True),
            Phase("full", config.full_epochs, config.full_lr, "conv1", True),
        ]
    phases = [phase for phase in phases if phase.epochs > 0]
    if not phases:
        flags = "--scratch-epochs" if config.weights == "none" else "--head-epochs/--finetune-epochs/--full-epochs"
        raise UsageError(f"nothing to train: {flags} are all 0")
    return phases


def resolve_precision(choice: str) -> str:
    """Return the Keras dtype policy for --precision (auto: bf16 where the CPU has it)."""
    if choice != "auto":
        return choice
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def prepare_run(config: TrainConfig, world_size: int) -> dict:
    """Rank 0: list, decode and split the data, check it fits the job, create the run folder.

    Returns the plan every rank follows: paths relative to the data root, labels,
    split indices and the run folder.
    """
    from hvdmri import runs
    from hvdmri.data.duplicates import screen_training_images
    from hvdmri.data.listing import list_images
    from hvdmri.data.split import stratified_split
    from hvdmri.resume import find_resume_point

    check_paths(config)
    data_root = resolve_data_root(config)
    listing = list_images(data_root)
    started = time.time()
    screened = screen_training_images(listing, config.exclude_duplicates_of)
    paths, labels, groups = screened.paths, screened.labels, screened.groups
    log = get_logger()
    log.info("decoded %d images in %.1f s: %d undecodable, %d duplicate groups kept on one side of the split",
             len(listing), time.time() - started, len(screened.skipped), screened.duplicate_group_count)
    if config.exclude_duplicates_of:
        log.info("--exclude-duplicates-of %s: left out %d training images that duplicate a test image",
                 config.exclude_duplicates_of, len(screened.excluded))
    if config.limit_per_class:
        taken: dict[int, int] = {}
        kept = []
        for i, label in enumerate(labels):
            taken[label] = taken.get(label, 0) + 1
            if taken[label] <= config.limit_per_class:
                kept.append(i)
        paths, labels, groups = [paths[i] for i in kept], [labels[i] for i in kept], [groups[i] for i in kept]
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed, groups=groups)
    if len(train_idx) < world_size:
        raise UsageError(f"-np {world_size} is larger than the {len(train_idx)} training images "
                         f"in {data_root}: every worker needs at least one image")

    run_dir = Path(config.run_dir or f"runs/run-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file; give a folder")
    if (run_dir / runs.MODEL_FILE).exists():
        raise UsageError(f"--run-dir {run_dir} already contains a finished run ({runs.MODEL_FILE}); "
                         f"choose another folder")
    global _created_run_dir, _run_dir_lock
    try:
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            _created_run_dir = run_dir
        if _run_dir_lock is None or Path(_run_dir_lock.name).parent != run_dir:
            # Elastic mode may prepare the run again in this process after a reset. A
            # second flock from this process would then conflict with its own first one.
            _run_dir_lock = runs.lock_run_dir(run_dir)
    except OSError as error:
        raise UsageError(f"--run-dir {run_dir}: cannot write there ({error.strerror or error}); "
                         f"choose a writable folder") from None
    resume = find_resume_point(run_dir, {**config.to_dict(), "data": str(data_root) if config.data else None})
    runs.write_json(run_dir / runs.CLASSES_FILE, {"class_names": list(listing.class_names)})
    return {
        "resume": dataclasses.asdict(resume) if resume else None,
        "data_root": str(data_root),
        "class_names": listing.class_names,
        "paths": paths,
        "labels": labels,
        "skipped": listing.skipped + screened.skipped,
        "excluded_duplicates": screened.excluded,
        "duplicate_groups": screened.duplicate_group_count,
        "train_idx": train_idx.tolist(),
        "val_idx": val_idx.tolist(),
        "run_dir": str(run_dir),
    }


# Rank 0 holds the run folder's lock for the whole run, and remembers whether it
# made the folder, so that a failed start can remove it again.
_run_dir_lock = None
_created_run_dir: Path | None = None


def check_paths(config: TrainConfig) -> None:
    """Fail before any work when a folder or file named by a flag is missing."""
    if config.exclude_duplicates_of and not Path(config.exclude_duplicates_of).is_dir():
        raise UsageError(f"--exclude-duplicates-of {config.exclude_duplicates_of}: no such folder")
    if config.run_dir:
        # The nearest folder that exists must take new files; checked before the data is decoded.
        existing = next(p for p in (Path(config.run_dir).resolve(), *Path(config.run_dir).resolve().parents)
                        if p.exists())
        if existing.is_dir() and not os.access(existing, os.W_OK):
            raise UsageError(f"--run-dir {config.run_dir}: {existing} is not writable; choose a writable folder")
    if config.weights not in ("none", "imagenet") and not Path(config.weights).is_file():
        raise UsageError(f"--weights {config.weights}: file not found (give a ResNet-50 no-top weights "
                         f"file, imagenet or none)")


def resolve_data_root(config: TrainConfig) -> Path:
    """Return --data, or the phantom set's Training folder (generated on first use)."""
    if config.data:
        return Path(config.data).resolve()
    from hvdmri.data.synth import ensure_phantom_set

    return ensure_phantom_set() / "Training"


@dataclass(frozen=True)
class RankShards:
    """This rank's share of the plan's training and validation images, and the steps every rank runs."""

    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    steps: int

    @classmethod
    def of(cls, plan: dict, data_root: Path, workers: Workers, batch_size: int) -> "RankShards":
        import numpy as np

        from hvdmri.data.split import shard, steps_per_epoch

        train_idx = shard(np.asarray(plan["train_idx"], int), workers.rank, workers.world_size)
        val_idx = shard(np.asarray(plan["val_idx"], int), workers.rank, workers.world_size)
        return cls([str(data_root / plan["paths"][i]) for i in train_idx],
                   [int(plan["labels"][i]) for i in train_idx],
                   [str(data_root / plan["paths"][i]) for i in val_idx],
                   [int(plan["labels"][i]) for i in val_idx],
                   steps_per_epoch(len(plan["train_idx"]), workers.world_size, batch_size))


def check_data_on_every_rank(workers: Workers, config: TrainConfig, plan: dict) -> Path:
    """Make sure every rank sees the data rank 0 listed; return this rank's data root.

    Nodes without a shared folder hold their own copy at the same path; the
    phantom set is generated locally where it is missing.
    """
    import horovod.tensorflow as hvd

    problem = None
    try:
        root = resolve_data_root(config) if not config.data else Path(plan["data_root"])
        for relative in (plan["paths"][0], plan["paths"][-1]):
            if not (root / relative).is_file():
                problem = f"{root / relative} not found"
                break
    except OSError as error:
        root, problem = Path(plan["data_root"]), str(error)
    if workers.world_size > 1:
        reports = hvd.allgather_object((workers.rank, socket.gethostname(), problem), name="data_check")
    else:
        reports = [(0, socket.gethostname(), problem)]
    failed = [(rank, host, text) for rank, host, text in reports if text]
    if failed:
        rank, host, text = failed[0]
        raise UsageError(f"rank {rank} on {host} cannot read the training data: {text} "
                         f"(every node needs the data folder at the same path)")
    return root


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from hvdmri.stopping import run_stoppable

    try:
        return run_stoppable("hvdmri.train", lambda: train(config))
    finally:
        if _created_run_dir is not None:
            from hvdmri.runs import remove_if_unused

            remove_if_unused(_created_run_dir)


def train(config: TrainConfig) -> Path:
    """Run every phase and write the run folder; return its path."""
    workers = setup_horovod(config.threads)
    log = get_logger()

    import horovod.tensorflow.keras as hvd
    import numpy as np
    import tensorflow as tf

    from hvdmri import runs
    from hvdmri.callbacks import (AverageBatchNormStatistics, EpochLogger, GlobalValidation, RunRecorder,
                                  StopOnDivergence, learning_rate_schedule)
    from hvdmri.data.cache import open_rank_caches
    from hvdmri.data.pipeline import DecodeFailureReport, DecodeFailures, make_dataset
    from hvdmri.features import use_feature_cache
    from hvdmri.model import build_model, resolve_weights, set_batchnorm_momentum, set_trainable
    from hvdmri.stopping import (StopAtStepBoundary, TrainingStopped, finish_stop, fit_rest_of_epoch, resumed_step,
                                 remove_leftovers, stop_request)

    phases = plan_phases(config)
    if config.memory_budget:
        from hvdmri.memory import check_memory_budget

        # Every rank checks the same numbers, so all of them stop, before any data is decoded.
        check_memory_budget(config.memory_budget, config.batch_size, config.image_size,
                            resolve_precision(config.precision))
    # Absolute paths, so config.json and the resume check compare like with like.
    config = replace(config, **{name: str(Path(getattr(config, name)).resolve())
                                for name in ("data", "exclude_duplicates_of") if getattr(config, name)})
    if config.elastic:
        # No collective may run before the elastic state sync: a worker that joins a
        # running job meets the others there.
        from hvdmri.elastic import train_elastic

        return train_elastic(config, phases)
    plan = run_on_chief(workers, lambda: prepare_run(config, workers.world_size), "prepare_run")
    data_root = check_data_on_every_rank(workers, config, plan)
    run_dir = Path(plan["run_dir"])
    config = replace(config, run_dir=str(run_dir), data=str(data_root) if config.data else None)
    class_names = tuple(plan["class_names"])
    if workers.is_chief:
        remove_leftovers(run_dir)
        runs.write_json(run_dir / runs.CONFIG_FILE, {
            **config.to_dict(), "data_root": plan["data_root"], "world_size": workers.world_size,
            "class_names": list(class_names), "train_images": len(plan["train_idx"]),
            "val_images": len(plan["val_idx"]), "skipped_files": plan["skipped"],
            "duplicate_groups": plan["duplicate_groups"], "excluded_duplicates": plan["excluded_duplicates"],
        })
    for relative, reason in plan["skipped"]:
        log.warning("skipped %s: %s", relative, reason)

    precision = resolve_precision(config.precision)
    tf.keras.mixed_precision.set_global_policy(precision)
    log.info("precision: %s%s%s", precision, " (CPU has bf16 support)" if config.precision == "auto"
             and precision != "float32" else "",
             "; ReLU and residual Add run as XLA kernels" if precision == "mixed_bfloat16"
             and not config.no_fused_relu else "")
    # The same seed on every rank gives identical initial weights; rank 0's are
    # broadcast anyway, the seed only makes runs repeatable.
    tf.keras.utils.set_random_seed(config.seed)

    # Data: this rank's shard of the training and validation sets.
    shards = RankShards.of(plan, data_root, workers, config.batch_size)
    steps, train_paths, val_paths = shards.steps, shards.train_paths, shards.val_paths
    decode_failures = DecodeFailures()
    train_cache = val_cache = None
    if config.cache_dir:
        train_cache, val_cache = open_rank_caches(config.cache_dir, workers.rank, config.image_size,
                                                  train_paths, val_paths)
    train_ds = make_dataset(train_paths, shards.train_labels, config.image_size,
                            config.batch_size, training=True, seed=config.seed + workers.rank,
                            augment=config.augment, failures=decode_failures, cache=train_cache)
    val_ds = make_dataset(val_paths, shards.val_labels, config.image_size,
                          config.batch_size, training=False, failures=decode_failures, cache=val_cache)
    log.info("data: %s, %d training and %d validation images, classes %s",
             plan["data_root"], len(plan["train_idx"]), len(plan["val_idx"]), ", ".join(class_names))
    log.info("global batch %d = %d workers x %d; %d steps per epoch", workers.world_size * config.batch_size,
             workers.world_size, config.batch_size, steps)

    # Model: only rank 0 downloads ImageNet weights; the others wait, then read the cached file.
    weights = resolve_weights(config.weights)
    if weights == "imagenet":
        run_on_chief(workers, lambda: build_model(len(class_names), config.image_size, "imagenet") and None,
                     "download_weights")
    model = build_model(len(class_names), config.image_size, weights,
                        fused_relu=False if config.no_fused_relu else None)
    if weights is None:
        set_batchnorm_momentum(model, config.scratch_bn_momentum)
        log.info("--weights none: a frozen random base would learn nothing, so the whole network "
                 "trains from the start (%d epochs, BatchNormalization momentum %g)",
                 phases[0].epochs, config.scratch_bn_momentum)

    total_epochs = sum(phase.epochs for phase in phases)
    resume = plan["resume"]
    start_epoch = resume["epoch"] if resume else 0
    # Steps of epoch start_epoch + 1 done before a clean stop, in this run's steps per epoch.
    resume_step = resumed_step(resume["step"], resume["steps_per_epoch"], steps) if resume else 0
    history: list[dict] = resume["history"] if resume else []
    best: dict = resume["best"] if resume else {}
    if resume:
        log.info("resuming %s after epoch %d of %d (phase '%s')", run_dir, start_epoch, total_epochs,
                 resume["phase"])
        if resume["world_size"] and resume["world_size"] != workers.world_size:
            log.info("the interrupted run had %d workers, this one has %d: learning rates are rescaled "
                     "to %d x the per-worker rate", resume["world_size"], workers.world_size,
                     workers.world_size)
        if resume_step != resume["step"]:
            log.info("the stopped epoch was at step %d of %d, and with %d steps per epoch now it continues "
                     "after step %d, the same share of the epoch", resume["step"], resume["steps_per_epoch"],
                     steps, resume_step)
    compression = hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none
    divergence = StopOnDivergence()
    # Keras' progress bar only in a terminal of a single worker: mpirun gives ranks a
    # pseudo-terminal, and bars from a job would interleave with the per-epoch lines.
    interactive = sys.stdout.isatty() and workers.world_size == 1
    epoch = 0
    started = time.time()
    for number, phase in enumerate(phases):
        if epoch + phase.epochs <= start_epoch:
            # Finished before the interruption; its weights are in the checkpoint.
            epoch += phase.epochs
            continue
        trainable = set_trainable(model, phase.train_from, phase.freeze_batchnorm)
        # Horovod: scale the learning rate by the number of workers, since the
        # global batch is world_size times larger.
        scaled_lr = phase.lr * workers.world_size
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(scaled_lr), compression=compression)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        log.info("phase %d/%d '%s': epochs %d-%d, %d trainable base layers, lr %.2e (%.2e x %d workers)",
                 number + 1, len(phases), phase.name, epoch + 1, epoch + phase.epochs, trainable,
                 scaled_lr, phase.lr, workers.world_size)
        if resume and epoch <= start_epoch:
            # The first phase of a resumed run: inside the phase, the optimizer state
            # continues too; at a phase boundary the new phase starts a fresh optimizer,
            # unless a clean stop saved it some steps into the phase.
            restore_checkpoint(workers, model, run_dir, with_optimizer=start_epoch > epoch or resume["step"] > 0,
                               checkpoint=resume["checkpoint"])
        # Phase 1 may train the head alone on stored base features; it shares its
        # layers and optimizer with model, which is what the checkpoints save.
        fit_model, fit_train_ds, fit_val_ds = model, train_ds, val_ds
        if config.feature_cache and number == 0:
            head = use_feature_cache(
                model, base_frozen=phase.train_from is None, augment=config.augment,
                image_size=config.image_size, batch_size=config.batch_size, seed=config.seed + workers.rank,
                train_paths=train_paths, train_labels=np.asarray(shards.train_labels), val_paths=val_paths,
                val_labels=np.asarray(shards.val_labels), train_cache=train_cache, val_cache=val_cache,
                failures=decode_failures)
            if head is not None:
                fit_model, fit_train_ds, fit_val_ds = head.model, head.train, head.val

        end = epoch + phase.epochs
        callbacks = [
            # Every rank, after every step: all ranks stop after the same step or none does.
            StopAtStepBoundary(stop_request, run_dir, workers.is_chief, workers.world_size),
            # Horovod: start every rank from rank 0's weights and optimizer state.
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            # Horovod: average the training metrics over ranks (equal step counts make
            # this the mean over all images seen).
            hvd.callbacks.MetricAverageCallback(),
            # Before validation and checkpoints, so both see the same model on every rank.
            AverageBatchNormStatistics(),
            GlobalValidation(fit_val_ds),
            divergence,
            # Every rank: the per-epoch count of undecodable images is an allgather.
            DecodeFailureReport(decode_failures),
        ]
        callbacks += learning_rate_schedule(scaled_lr, epoch, end, config.warmup_epochs if number == 0 else 0,
                                            steps)
        if workers.is_chief:
            callbacks += [
                EpochLogger(total_epochs, phase.name, steps, workers.world_size * config.batch_size,
                            step_lines=not interactive),
                RunRecorder(run_dir, phase.name, history, best, weights_model=model, keep=config.keep_checkpoints),
            ]
        verbose = 1 if (workers.is_chief and interactive) else 0
        first_epoch = max(epoch, start_epoch)
        try:
            if resume_step:
                fit_rest_of_epoch(fit_model, fit_train_ds, callbacks, first_epoch, resume_step, steps,
                                  resume["metric_sums"], verbose)
                first_epoch, resume_step = first_epoch + 1, 0
            if first_epoch < end:
                fit_model.fit(fit_train_ds, initial_epoch=first_epoch, epochs=end, steps_per_epoch=steps,
                              callbacks=callbacks, verbose=verbose)
        except TrainingStopped as stop:
            finish_stop(workers, model, run_dir, stop, phase.name, best, steps)
            raise
        epoch = end
        if divergence.epoch:
            break

    if resume and start_epoch >= total_epochs:
        # Every epoch was done; the run stopped while writing the final model.
        restore_checkpoint(workers, model, run_dir, with_optimizer=False)
    log.info("training finished in %.1f min", (time.time() - started) / 60)
    if divergence.epoch:
        # phase is the loop's last value: the phase that diverged.
        hint = (f"lower the learning rate (now {phase.lr:g} per worker for phase '{phase.name}') "
                f"and train into a new --run-dir")
        if not best:
            raise UsageError(f"training diverged in epoch {divergence.epoch} (loss {divergence.loss}) before "
                             f"any sound epoch: {hint}")
        log.warning("training stopped after epoch %d: the loss became %s; the final model is epoch %d's. "
                    "To train longer, %s", divergence.epoch, divergence.loss, best["epoch"], hint)
    finish_run(workers, model, config, plan, run_dir, best, precision)
    return run_dir


def restore_checkpoint(workers: Workers, model, run_dir: Path, with_optimizer: bool,
                       checkpoint: str = "last.weights.h5") -> None:
    """Load checkpoints/<checkpoint> on rank 0 and give every rank the same state.

    Raises:
        RuntimeError: the ranks hold different weights after the broadcast.
    """
    import horovod.tensorflow as hvd

    from hvdmri import runs
    from hvdmri.resume import weights_checksum

    optimizer = model.optimizer
    if with_optimizer:
        # Keras loads optimizer variables only into a built optimizer; building it
        # creates the Adam moments and step count the checkpoint holds.
        optimizer.build(model.trainable_variables)
    if workers.is_chief:
        model.load_weights(str(run_dir / runs.CHECKPOINT_DIR / checkpoint))
    variables = list(model.variables) + (list(optimizer.variables) if with_optimizer else [])
    if workers.world_size > 1:
        # Horovod: the other ranks take rank 0's restored weights and optimizer state.
        hvd.broadcast_variables(variables, root_rank=0)
        checksums = hvd.allgather_object(weights_checksum(variables), name="resume_checksum")
    else:
        checksums = [weights_checksum(variables)]
    if len(set(checksums)) != 1:
        raise RuntimeError(f"ranks disagree on the restored weights: checksums {checksums}")
    steps_done = int(optimizer.iterations.numpy()) if with_optimizer else 0
    get_logger().info("restored the checkpoint: weights checksum %s on all %d ranks%s", checksums[0],
                      workers.world_size, f", optimizer at step {steps_done}" if with_optimizer else
                      " (new phase: fresh optimizer)")


def finish_run(workers: Workers, model, config: TrainConfig, plan: dict, run_dir: Path,
               best: dict, precision: str) -> None:
    """Restore the best epoch's weights, save the final model, write validation metrics."""
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    from hvdmri import runs
    from hvdmri.data.pipeline import make_dataset
    from hvdmri.data.split import shard
    from hvdmri.inference import gather_by_index, predict_shard
    from hvdmri.metrics import classification_metrics, headline
    from hvdmri.model import build_model

    log = get_logger()
    best_path = run_dir / runs.CHECKPOINT_DIR / "best.weights.h5"
    if workers.is_chief and plan["val_idx"]:
        model.load_weights(str(best_path))
        log.info("final model: weights of epoch %d (%s), the best val_accuracy %.4f",
                 best.get("epoch", 0), best.get("phase", "?"), best.get("val_accuracy", math.nan))
    if workers.world_size > 1:
        # Horovod: the other ranks take rank 0's restored weights.
        hvd.broadcast_variables(model.variables, root_rank=0)

    metrics = {"precision": precision}
    if plan["val_idx"]:
        val_all = np.asarray(plan["val_idx"], int)
        val_idx = shard(val_all, workers.rank, workers.world_size)
        root = Path(config.data) if config.data else Path(plan["data_root"])
        dataset = make_dataset([str(root / plan["paths"][i]) for i in val_idx],
                               [plan["labels"][i] for i in val_idx], config.image_size,
                               config.batch_size, training=False, with_index=True)
        local_positions, probabilities = predict_shard(model, dataset)
        ids, probabilities = gather_by_index(val_idx[local_positions], probabilities, workers.world_size)
        y_true = np.asarray(plan["labels"])[ids]
        metrics.update(classification_metrics(y_true, probabilities, plan["class_names"]))
        metrics["unreadable_images"] = int(len(val_all) - len(ids))

    if workers.is_chief:
        # The saved model is float32 and carries no optimizer, so evaluate and
        # predict load it with plain Keras on any CPU.
        tf.keras.mixed_precision.set_global_policy("float32")
        clean = build_model(len(plan["class_names"]), config.image_size, weights=None)
        clean.set_weights(model.get_weights())
        with runs.atomic_path(run_dir / runs.MODEL_FILE) as temporary:
            clean.save(str(temporary))
        runs.write_json(run_dir / runs.METRICS_FILE, metrics)
        if "accuracy" in metrics:
            log.info("validation: %s (%d images)", headline(metrics), metrics["support"])
        log.info("run folder: %s", run_dir)


if __name__ == "__main__":
    sys.exit(main())
