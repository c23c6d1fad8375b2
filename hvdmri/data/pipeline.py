"""tf.data pipelines: file paths in, preprocessed batches out, with bounded memory.

Only paths are shuffled and held in memory; images are decoded in parallel as
batches are needed, so a data set of any size streams through a small buffer.
An optional on-disk cache (hvdmri.data.cache) replaces decoding from the second
epoch on; augmentation still runs on every epoch's batches.
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf

from hvdmri.data.cache import ImageCache
from hvdmri.data.decode import DecodeError, load_image, preprocess
from hvdmri.distributed import get_logger

AUTOTUNE = tf.data.AUTOTUNE
# Files named per epoch in the decode-failure report; the rest are counted.
MAX_NAMED_FAILURES = 20


class DecodeFailures:
    """A thread-safe tally of the files this process's input pipelines could not decode.

    One instance may serve several datasets (training and validation).
    DecodeFailureReport reads and resets the count at the end of each epoch.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._reasons: dict[str, str] = {}
        self._blank_shard_size = 0

    def record(self, path: str, reason: str) -> None:
        with self._lock:
            self._count += 1
            self._reasons[path] = reason

    def mark_blank_shard(self, n_files: int) -> None:
        """Note that none of the n_files of a training shard decodes."""
        with self._lock:
            self._blank_shard_size = n_files

    def take_count(self) -> int:
        """Return the failures recorded since the previous call, and reset the count."""
        with self._lock:
            count, self._count = self._count, 0
            return count

    def reasons(self) -> dict[str, str]:
        """Return {path: DecodeError message} for every file that failed so far."""
        with self._lock:
            return dict(self._reasons)

    @property
    def blank_shard_size(self) -> int:
        """Files in a training shard where none decodes; 0 when some decode."""
        return self._blank_shard_size


class DecodeFailureReport(tf.keras.callbacks.Callback):
    """Sum every rank's decode failures at each epoch end and log them on rank 0.

    Every rank must carry this callback, because the sum is a Horovod allgather
    that waits for all ranks. The total goes into the epoch logs as decode_failures.
    """

    def __init__(self, failures: DecodeFailures):
        super().__init__()
        self.failures = failures
        self._named: set[str] = set()

    def on_epoch_end(self, epoch, logs=None):
        # NOTE: decoding runs ahead of training (parallel map and prefetch), so a
        # failure near the end of one epoch may be counted in the next.
        local = (self.failures.take_count(), self.failures.reasons(), self.failures.blank_shard_size)
        reports = _gather_from_ranks(local, name="decode_failures")
        total = sum(count for count, _, _ in reports)
        if logs is not None:
            logs["decode_failures"] = total
        if total == 0:
            return

        reasons: dict[str, str] = {}
        for _, rank_reasons, _ in reports:
            reasons.update(rank_reasons)
        log = get_logger()
        log.warning("epoch %d: %d images could not be decoded and were left out "
                    "(%d distinct files so far)", epoch + 1, total, len(reasons))
        # Name each file once per run, so a bad file does not repeat in every epoch's log.
        new = sorted(path for path in reasons if path not in self._named)
        for path in new[:MAX_NAMED_FAILURES]:
            log.warning("  %s", reasons[path])
        if len(new) > MAX_NAMED_FAILURES:
            log.warning("  ... and %d more files", len(new) - MAX_NAMED_FAILURES)
        self._named.update(new)
        for rank, (_, _, blank_size) in enumerate(reports):
            if blank_size:
                log.warning("rank %d: none of the %d training images in its shard can be decoded; "
                            "it runs its steps on blank images with sample weight 0, so it adds no "
                            "gradient. Remove or fix the files named above.", rank, blank_size)


def _gather_from_ranks(value, name: str) -> list:
    """Return [value of rank 0, value of rank 1, ...]; just [value] without Horovod."""
    import horovod.tensorflow as hvd

    if not hvd.is_initialized() or hvd.size() == 1:
        return [value]
    return hvd.allgather_object(value, name=name)


def _make_decoder(paths: list[str], image_size: int, training: bool, failures: DecodeFailures | None,
                  cache: ImageCache | None = None):
    """Return decode(path, index) -> (image, weight, keep) for tf.numpy_function.

    With a cache, a decoded image is read from its slot when present and written
    there after decoding otherwise. Undecodable files are never cached, so they
    fail and are counted again in every epoch.

    A failed file yields a black image with weight 0 and keep False, so the
    filter drops it. When every file of a training shard has failed, keep turns
    True: the repeated dataset would otherwise never yield a batch and this
    rank would stall the others in the next allreduce.

    TODO: the blank images still pass through BatchNormalization, so on a rank
    with a blank shard its moving statistics drift. This matters on rank 0 only,
    whose weights are saved.
    """
    failed: set[int] = set()
    lock = threading.Lock()
    blank = np.zeros((image_size, image_size, 3), np.uint8)

    def decode(path: bytes, index: np.int64):
        if cache is not None:
            image = cache.get(int(index))
            if image is not None:
                return image, np.float32(1.0), True
        try:
            image = load_image(path.decode(), image_size)
        except DecodeError as error:
            with lock:
                failed.add(int(index))
                all_failed = len(failed) == len(paths)
            if failures is not None:
                failures.record(path.decode(), str(error))
                if training and all_failed:
                    failures.mark_blank_shard(len(paths))
            return blank, np.float32(0.0), training and all_failed
        with lock:
            # A file that failed once (a flaky network share) counts again when it reads.
            failed.discard(int(index))
        if cache is not None:
            cache.put(int(index), image)
        return image, np.float32(1.0), True

    return decode


def make_augmenter(seed: int) -> tf.keras.Sequential:
    """Light augmentation on 0-255 RGB: flip, small rotation and zoom, brightness."""
    # float32 whatever the global mixed-precision policy: these layers run in the
    # input pipeline, and some of their image ops have no bfloat16 kernel.
    return tf.keras.Sequential([
        tf.keras.layers.RandomFlip("horizontal", seed=seed, dtype="float32"),
        tf.keras.layers.RandomRotation(0.04, fill_mode="constant", seed=seed + 1, dtype="float32"),
        tf.keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2, dtype="float32"),
        tf.keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3, dtype="float32"),
    ], name="augmentation")


def make_dataset(paths: list[str], labels: list[int], image_size: int, batch_size: int, *,
                 training: bool, seed: int = 0, augment: bool = True,
                 with_index: bool = False, failures: DecodeFailures | None = None,
                 cache: ImageCache | None = None) -> tf.data.Dataset:
    """Build the batches for one rank's shard.

    Files that fail to decode are left out and recorded in failures. A training
    shard where no file decodes yields blank images with sample weight 0 instead,
    so its rank keeps stepping with the others.

    Args:
        paths: absolute image paths of this rank's shard.
        labels: their labels.
        training: shuffle every epoch, repeat forever and augment. The caller sets
            steps_per_epoch, so every rank runs the same number of steps.
        seed: shuffle and augmentation seed; pass a different one per rank.
        with_index: also yield each image's position in paths, so a caller can tell
            which files were dropped as undecodable.
        failures: the tally that DecodeFailureReport logs; None records nothing.
        cache: this rank's on-disk cache of decoded images for these paths, in
            this order; None decodes every image in every epoch.

    Yields:
        Training: (images, labels, sample_weights), the tuple Keras' fit() takes.
        Otherwise: (images, labels). with_index appends the indices to either.
        Images are float32 and preprocessed.
    """
    indices = np.arange(len(paths), dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32), indices))
    if training:
        # Shuffle paths, not decoded images: the buffer holds the whole shard at
        # a few bytes per entry.
        dataset = dataset.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
    if cache is not None and (cache.size != len(paths) or cache.image_shape[0] != image_size):
        raise ValueError(f"the image cache in {cache.folder} contains {cache.size} images of "
                         f"{cache.image_shape[0]} px; this dataset has {len(paths)} of {image_size} px")
    decode = _make_decoder(paths, image_size, training, failures, cache)

    def load(path, label, index):
        image, weight, keep = tf.numpy_function(decode, [path, index], [tf.uint8, tf.float32, tf.bool],
                                                name="decode_image")
        image.set_shape((image_size, image_size, 3))
        weight.set_shape(())
        keep.set_shape(())
        return image, label, weight, index, keep

    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=not training)
    dataset = dataset.filter(lambda image, label, weight, index, keep: keep)
    dataset = dataset.map(lambda image, label, weight, index, keep: (image, label, weight, index))
    dataset = dataset.batch(batch_size)

    augmenter = make_augmenter(seed) if training and augment else None

    def finish(images, labels, weights, index):
        images = tf.cast(images, tf.float32)
        if augmenter is not None:
            images = augmenter(images, training=True)
        images = preprocess(images)
        outputs = (images, labels, weights) if training else (images, labels)
        return (*outputs, index) if with_index else outputs

    dataset = dataset.map(finish, num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)
