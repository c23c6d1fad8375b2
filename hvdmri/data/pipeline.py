"""tf.data pipelines: file paths in, preprocessed batches out, with bounded memory.

Only paths are shuffled and held in memory; images are decoded in parallel as
batches are needed, so a data set of any size streams through a small buffer.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdmri.data.decode import DecodeError, load_image, preprocess

AUTOTUNE = tf.data.AUTOTUNE


def _decode_or_flag(path: bytes, image_size: int) -> tuple[np.ndarray, bool]:
    try:
        return load_image(path.decode(), int(image_size)), True
    except DecodeError:
        # The file is dropped by the filter below. The listing already removed
        # files whose header or size is wrong, so this is rare.
        return np.zeros((int(image_size), int(image_size), 3), np.uint8), False


def _load(path, label, index, image_size: int):
    image, ok = tf.numpy_function(_decode_or_flag, [path, image_size], [tf.uint8, tf.bool],
                                  name="decode_image")
    image.set_shape((image_size, image_size, 3))
    ok.set_shape(())
    return image, label, index, ok


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
                 with_index: bool = False) -> tf.data.Dataset:
    """Build the batches for one rank's shard.

    Args:
        paths: absolute image paths of this rank's shard.
        labels: their labels.
        training: shuffle every epoch, repeat forever and augment. The caller sets
            steps_per_epoch, so every rank runs the same number of steps.
        seed: shuffle and augmentation seed; pass a different one per rank.
        with_index: also yield each image's position in paths, so a caller can tell
            which files were dropped as undecodable.

    Yields:
        (images, labels) or (images, labels, indices): images float32, preprocessed.
    """
    indices = np.arange(len(paths), dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32), indices))
    if training:
        # Shuffle paths, not decoded images: the buffer holds the whole shard at
        # a few bytes per entry.
        dataset = dataset.shuffle(max(1, len(paths)), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
    dataset = dataset.map(lambda p, y, i: _load(p, y, i, image_size),
                          num_parallel_calls=AUTOTUNE, deterministic=not training)
    # TODO: count the images dropped here and report them per epoch; a shard
    # whose files all fail to decode would make a training rank wait forever.
    dataset = dataset.filter(lambda image, label, index, ok: ok)
    dataset = dataset.map(lambda image, label, index, ok: (image, label, index))
    dataset = dataset.batch(batch_size)

    augmenter = make_augmenter(seed) if training and augment else None

    def finish(images, labels, index):
        images = tf.cast(images, tf.float32)
        if augmenter is not None:
            images = augmenter(images, training=True)
        images = preprocess(images)
        return (images, labels, index) if with_index else (images, labels)

    dataset = dataset.map(finish, num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)
