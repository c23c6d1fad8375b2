"""One benchmark run inside one worker process: build, warm up, time, report."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from hvdmri.bench.options import BenchConfig

NUM_CLASSES = 4


def run_worker(config: BenchConfig) -> dict:
    """Run the configuration in this process and return this worker's measurements."""
    from hvdmri.bench.measure import load_average

    load_start = load_average()
    rank, world_size, strategy = start_workers(config)
    import tensorflow as tf

    from hvdmri.train import resolve_precision

    precision = resolve_precision(config.precision)
    tf.keras.mixed_precision.set_global_policy(precision)
    tf.keras.utils.set_random_seed(config.seed)
    if strategy is not None:
        dataset = strategy.distribute_datasets_from_function(
            lambda context: make_input(config, context.input_pipeline_id, context.num_input_pipelines))
        with strategy.scope():
            model = compiled_model(config, world_size)
    else:
        dataset = make_input(config, rank, world_size)
        model = compiled_model(config, world_size)
    measured = _time_fit(config, model, dataset)
    if config.mode == "hvdmri" and config.breakdown_steps:
        # Built after fit on purpose: peak_rss_gib above is the peak of model.fit alone.
        measured["breakdown_s"] = time_step_parts(model, iter(dataset), config.breakdown_steps)
    import horovod

    from hvdmri.bench.measure import cpu_has_bf16

    return {"rank": rank, "world_size": world_size, "precision": precision, **measured,
            "load_average_start": load_start, "load_average_end": load_average(),
            # What Horovod ran with: this flag, else horovodrun's or hvdmri's default. None
            # without Horovod, or when Horovod's autotuner chose it.
            "horovod_cycle_time_ms": float(os.environ["HOROVOD_CYCLE_TIME"])
            if config.mode == "hvdmri" and "HOROVOD_CYCLE_TIME" in os.environ else None,
            "host": socket.gethostname(), "cores": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
            "tensorflow": tf.__version__, "horovod": horovod.__version__}


def start_workers(config: BenchConfig):
    """Initialise the mode's runtime; return (rank, world_size, MWMS strategy or None).

    Thread pools are sized first, as in hvdmri.train: TensorFlow fixes them at its first op.
    """
    if config.mode == "hvdmri":
        from hvdmri.distributed import setup_horovod

        if config.cycle_time_ms is not None:
            # Horovod reads it once, in hvd.init().
            os.environ["HOROVOD_CYCLE_TIME"] = str(config.cycle_time_ms)
        workers = setup_horovod(config.threads)
        return workers.rank, workers.world_size, None

    import tensorflow as tf

    local_workers = config.np
    threads = config.threads or max(1, (os.cpu_count() or 1) // local_workers)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if config.mode == "keras":
        return 0, 1, None
    cluster = json.loads(os.environ["TF_CONFIG"])
    # RING: collectives over gRPC between the workers, the CPU counterpart of
    # Horovod's Gloo ring allreduce.
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return cluster["task"]["index"], len(cluster["cluster"]["worker"]), strategy


def make_input(config: BenchConfig, rank: int, world_size: int):
    """Return this worker's training batches: one random batch repeated, or the hvdmri pipeline."""
    import numpy as np
    import tensorflow as tf

    if config.input == "real":
        from hvdmri.data.listing import list_images
        from hvdmri.data.pipeline import make_dataset
        from hvdmri.data.split import shard

        listing = list_images(config.data)
        mine = shard(np.arange(len(listing)), rank, world_size)
        paths = [str(listing.root / listing.paths[i]) for i in mine]
        labels = [listing.labels[i] for i in mine]
        return make_dataset(paths, labels, config.image_size, config.batch_size, training=True,
                            seed=config.seed + rank, augment=config.augment)

    from hvdmri.data.decode import preprocess

    generator = tf.random.Generator.from_seed(config.seed + rank)
    shape = (config.batch_size, config.image_size, config.image_size, 3)
    images = preprocess(generator.uniform(shape, 0.0, 255.0))
    labels = generator.uniform((config.batch_size,), 0, NUM_CLASSES, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def compiled_model(config: BenchConfig, world_size: int):
    """Build and compile the hvdmri model for the mode, whole network trainable as with --weights none."""
    import tensorflow as tf

    from hvdmri.model import build_model, set_trainable

    # As in hvdmri.train: XLA ReLU kernels when the policy is bf16, unless switched off.
    model = build_model(NUM_CLASSES, config.image_size, weights=None,
                        fused_relu=False if config.no_fused_relu else None)
    set_trainable(model, "conv1", freeze_batchnorm=False)
    optimizer = tf.keras.optimizers.Adam(1e-4 * world_size)
    if config.mode == "hvdmri":
        import horovod.tensorflow.keras as hvd

        compression = hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(optimizer, compression=compression)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _time_fit(config: BenchConfig, model, dataset) -> dict:
    """Run warm-up and timed steps in one model.fit call and summarise the timed ones."""
    from hvdmri.bench.measure import StepTimer, peak_rss_gib, step_summary

    timer = StepTimer()
    callbacks = [timer]
    if config.mode == "hvdmri":
        import horovod.tensorflow.keras as hvd

        from hvdmri.stopping import StopAtStepBoundary, StopRequest

        # These are the callbacks hvdmri.train runs at every step or epoch end, so their
        # cost counts. With several workers the stop check adds one allreduce per step.
        # Its run folder is never created, so it never finds a STOP file.
        no_run_dir = Path(tempfile.gettempdir()) / f"hvdmri-bench-no-run-{os.getpid()}"
        callbacks = [StopAtStepBoundary(StopRequest(), no_run_dir, hvd.rank() == 0, hvd.size()),
                     hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback(),
                     timer]
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=config.warmup_steps + config.steps, callbacks=callbacks,
              verbose=0)
    summary = step_summary(timer.step_ends, config.warmup_steps, config.batch_size)
    summary["warmup_s"] = round(timer.step_ends[config.warmup_steps - 1] - started, 3)
    summary["peak_rss_gib"] = round(peak_rss_gib(), 3)
    return summary


def time_step_parts(model, batches, steps: int) -> dict:
    """Time the parts of a Horovod training step one after another; return median seconds.

    model.fit runs a step as one graph, where gradient allreduces may overlap the
    rest of the backward pass, so its parts cannot be timed from outside. Here they
    run as separate functions with a wait in between, so the parts add up to more
    than a fit step, and the allreduce also contains the wait for the slowest rank.
    """
    import statistics

    import tensorflow as tf

    optimizer = model.optimizer
    variables = model.trainable_variables
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def compute(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        return tape.gradient(loss, variables)

    @tf.function
    def allreduce(gradients):
        # NOTE: _allreduce is a private method of Horovod 0.28.1's DistributedOptimizer,
        # used so the same fused, compressed allreduce runs as inside model.fit.
        return optimizer._allreduce(gradients, variables)

    @tf.function
    def update(gradients):
        optimizer.apply_gradients(zip(gradients, variables))

    parts: dict[str, list[float]] = {"input_wait": [], "compute": [], "allreduce": [], "update": []}
    # The first step traces the three functions and is not counted.
    for step in range(steps + 1):
        started = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        gradients = compute(batch[0], batch[1])
        computed = time.perf_counter()
        gradients = allreduce(gradients)
        reduced = time.perf_counter()
        update(gradients)
        updated = time.perf_counter()
        if step:
            for name, seconds in zip(parts, (fetched - started, computed - fetched, reduced - computed,
                                             updated - reduced)):
                parts[name].append(seconds)
    return {name: round(statistics.median(values), 4) for name, values in parts.items()}
