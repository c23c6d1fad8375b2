"""Check that the input pipeline outruns training: decode, pipeline and training rates per worker.

    python -m hvdmri.data.throughput --data ../shared/data/brain-tumor-mri/Training --workers 2

Three measurements, each on this worker's share of the node's cores
(cores / --workers, as training gives each worker):
- decode: images/s of load_image (OpenCV decode and resize) in one Python thread;
- pipeline: images/s that make_dataset delivers with augmentation on, its
  tf.data thread pool limited to the worker's cores;
- training: images/s of ResNet-50 training steps (synthetic input, random
  weights, Adam) at the same image size and precision as training uses.

The pipeline/training ratio bounds the share of a worker's time that decoding
would take beside training: at a ratio of 5 it is at most a fifth.
Prints a table and one JSON line; other processes on the machine lower every
figure, so the load average is part of the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from hvdmri.cli import CommandParser, image_size, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m hvdmri.data.throughput",
                           description="Measure decode, input-pipeline and training images/s per worker.")
    parser.add_argument("--data", required=True, help="class-folder tree to read images from, e.g. Training")
    parser.add_argument("--image-size", type=image_size, default=224,
                        help="model input side in pixels (default 224)")
    parser.add_argument("--images", type=positive_int, default=300,
                        help="images decoded and streamed through the pipeline (default 300)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="timed training steps after 2 warm-up steps (default 5)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="workers that would share this node; each gets cores / workers threads "
                             "(default 2)")
    parser.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16"), default="auto",
                        help="training precision; auto as in hvdmri.train (default auto)")
    parser.add_argument("--cache-dir", help="also time reads from an image cache in this folder")
    parser.add_argument("--seed", type=int, default=0, help="which images are sampled (default 0)")
    return parser


def sample_paths(root: str, count: int, seed: int) -> list[str]:
    from hvdmri.data.listing import list_images

    listing = list_images(root)
    paths = [listing.absolute(relative) for relative in listing.paths]
    order = np.random.default_rng(seed).permutation(len(paths))[:count]
    return [paths[i] for i in order]


def decode_rate(paths: list[str], size: int) -> float:
    """Time load_image over paths in this thread, with OpenCV's own thread pool off."""
    import cv2

    from hvdmri.data.decode import DecodeError, load_image

    # OpenCV parallelises resize over its own threads; one thread means one core here.
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    started, decoded = time.perf_counter(), 0
    for path in paths:
        try:
            load_image(path, size)
            decoded += 1
        except DecodeError:
            pass
    seconds = time.perf_counter() - started
    cv2.setNumThreads(previous)
    return decoded / seconds


def cache_read_rate(paths: list[str], size: int, cache_dir: str) -> float:
    """Fill a rank-0 cache with paths, then time reading every slot back in one thread."""
    from hvdmri.data.cache import ImageCache
    from hvdmri.data.decode import DecodeError, load_image

    cache = ImageCache(cache_dir, 0, paths, size, split="throughput")
    for index, path in enumerate(paths):
        try:
            cache.put(index, load_image(path, size))
        except DecodeError:
            pass
    started = time.perf_counter()
    read = sum(cache.get(index) is not None for index in range(len(paths)))
    rate = read / (time.perf_counter() - started)
    cache.close()
    return rate


def pipeline_rate(paths: list[str], size: int, batch_size: int, threads: int) -> float:
    """Stream the paths through make_dataset (training mode, augmentation on) and time it."""
    import tensorflow as tf

    from hvdmri.data.pipeline import make_dataset

    dataset = make_dataset(paths, [0] * len(paths), size, batch_size, training=True, augment=True, seed=0)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    dataset = dataset.with_options(options)
    batches = max(2, len(paths) // batch_size)
    iterator = iter(dataset)
    next(iterator)  # builds the graph and starts the decode threads
    started = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    return (batches - 1) * batch_size / (time.perf_counter() - started)


def training_rate(size: int, batch_size: int, steps: int) -> float:
    """Time ResNet-50 training steps on random input; the weights are random too."""
    import tensorflow as tf

    from hvdmri.model import build_model

    model = build_model(4, size, weights=None)
    model.compile(tf.keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, size, size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 4, batch_size).astype(np.int32))
    for _ in range(2):  # tracing and first-touch allocation
        model.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return steps * batch_size / (time.perf_counter() - started)


def measure(args: argparse.Namespace) -> dict:
    import tensorflow as tf

    from hvdmri.train import resolve_precision

    threads = max(1, (os.cpu_count() or 1) // args.workers)
    # Thread pools must be sized before TensorFlow runs its first op.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    precision = resolve_precision(args.precision)
    paths = sample_paths(args.data, args.images, args.seed)

    result = {"image_size": args.image_size, "images": len(paths), "batch_size": args.batch_size,
              "workers": args.workers, "threads_per_worker": threads, "precision": precision,
              "load_average_before": os.getloadavg()[0]}
    result["decode_images_per_s_one_thread"] = decode_rate(paths, args.image_size)
    if args.cache_dir:
        result["cache_read_images_per_s_one_thread"] = cache_read_rate(paths, args.image_size, args.cache_dir)
    result["pipeline_images_per_s"] = pipeline_rate(paths, args.image_size, args.batch_size, threads)
    tf.keras.mixed_precision.set_global_policy(precision)
    result["training_images_per_s"] = training_rate(args.image_size, args.batch_size, args.steps)
    result["pipeline_over_training"] = result["pipeline_images_per_s"] / result["training_images_per_s"]
    result["load_average_after"] = os.getloadavg()[0]
    return result


def print_table(result: dict) -> None:
    print(f"{result['image_size']} px, {result['threads_per_worker']} threads per worker "
          f"({result['workers']} workers), {result['precision']}, load average "
          f"{result['load_average_before']:.2f} -> {result['load_average_after']:.2f}")
    rows = [("decode, 1 thread", "decode_images_per_s_one_thread"),
            ("cache read, 1 thread", "cache_read_images_per_s_one_thread"),
            ("pipeline (augmenting)", "pipeline_images_per_s"),
            ("ResNet-50 training", "training_images_per_s")]
    for label, key in rows:
        if key in result:
            print(f"  {label:<24} {result[key]:9.1f} images/s")
    print(f"  pipeline / training      {result['pipeline_over_training']:9.1f} x")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"{build_parser().prog}: error: --data {args.data}: no such folder", file=sys.stderr)
        return 2
    if args.cache_dir is None:
        print_table(measure(args))
        return 0
    os.makedirs(args.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as scratch:
        args.cache_dir = scratch
        print_table(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
