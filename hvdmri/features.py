"""Phase-1 feature caching: run the frozen base once per image, then train only the head.

    python -m hvdmri.train --data Training --weights resnet50_notop.h5 --no-augment --feature-cache

While the base is frozen and BatchNormalization runs in inference mode, the
pooled output of ResNet-50 for an image is the same in every epoch of phase 1.
Each rank therefore computes it once for its own training and validation shards
(2048 float32 numbers, 8 KiB per image) and phase 1 trains a model made of the
head layers alone on those vectors. The head model shares its layer objects
with the full model, so its trained weights already sit in the full model when
phase 2 starts.

Everything else in phase 1 stays as in the normal path. Both models are
compiled with the same optimizer object, so checkpoints contain its state.
Every rank runs the same steps per epoch with the same learning-rate warm-up
and schedule, and global validation is the same computation, run by the head
on the validation features.

With augmentation, each epoch feeds the base different pixels, so stored
features would train the head on un-augmented images only. The cache is then
not used, and the log gives the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hvdmri.distributed import allreduce_sum, get_logger

POOLING_LAYER = "avg_pool"


def feature_cache_unusable_reason(augment: bool, base_frozen: bool) -> str | None:
    """Return why --feature-cache cannot serve a phase, or None when it can."""
    if not base_frozen:
        return "the base trains in this phase, so its features change at every step"
    if augment:
        return ("augmentation changes the images in every epoch, so features computed once would train "
                "the head on un-augmented images only; add --no-augment to use the cache")
    return None


def build_head_model(model: tf.keras.Model) -> tf.keras.Model:
    """Build a model from pooled features to class probabilities out of model's own head layers.

    The layers are the same objects as in model, so training this model trains
    model's head.
    """
    layers = list(model.layers)
    start = [layer.name for layer in layers].index(POOLING_LAYER) + 1
    pooled = model.get_layer(POOLING_LAYER).output
    features = tf.keras.Input((int(pooled.shape[-1]),), name="pooled_features")
    outputs = features
    for layer in layers[start:]:
        outputs = layer(outputs)
    return tf.keras.Model(features, outputs, name="head_on_features")


def extract_features(model: tf.keras.Model,
                     *datasets: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the base and pooling in inference mode over datasets of (images, labels, indices).

    Returns:
        One (indices, features) pair per dataset: each decoded image's position in
        its path list, and its pooled features as float32 (undecodable files are absent).
    """
    extractor = tf.keras.Model(model.input, model.get_layer(POOLING_LAYER).output)
    run = tf.function(lambda images: extractor(images, training=False))
    # A short last batch is padded to the first batch's size, so ResNet-50 is traced
    # once. An unknown batch dimension would also trace once, but measured 30% slower
    # here (TF 2.15 on CPU, bfloat16).
    batch_size = None
    results = []
    for dataset in datasets:
        indices, features = [], []
        for images, _, index in dataset:
            count = int(images.shape[0])
            batch_size = batch_size or count
            padding = [[0, max(0, batch_size - count)]] + [[0, 0]] * (len(images.shape) - 1)
            features.append(tf.cast(run(tf.pad(images, padding))[:count], tf.float32).numpy())
            indices.append(index.numpy())
        width = int(extractor.output.shape[-1])
        results.append((np.concatenate(indices) if indices else np.zeros(0, np.int64),
                        np.concatenate(features) if features else np.zeros((0, width), np.float32)))
    return results


def feature_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, *,
                    training: bool, seed: int = 0) -> tf.data.Dataset:
    """Batch stored features like make_dataset batches images.

    Training: shuffled every epoch, repeated, with sample weight 1, yielding
    (features, labels, weights). Otherwise (features, labels) in order, once.
    """
    dataset = tf.data.Dataset.from_tensor_slices((features.astype(np.float32), labels.astype(np.int32)))
    if training:
        dataset = dataset.shuffle(max(1, len(features)), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
        dataset = dataset.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@dataclass
class HeadOnFeatures:
    """Head-only model and feature datasets that phase 1 fits in place of the full model."""

    model: tf.keras.Model
    train: tf.data.Dataset
    val: tf.data.Dataset
    seconds: float  # wall time of this rank's feature extraction


def use_feature_cache(model: tf.keras.Model, *, base_frozen: bool, augment: bool, image_size: int,
                      batch_size: int, seed: int, train_paths: list[str], train_labels: np.ndarray,
                      val_paths: list[str], val_labels: np.ndarray, train_cache=None, val_cache=None,
                      failures=None) -> HeadOnFeatures | None:
    """Set phase 1 up on stored features, or log why it cannot be and return None.

    The arguments describe this rank's shards as train() keeps them. The image
    caches and the decode-failure tally are the ones the image datasets use.
    """
    from hvdmri.data.pipeline import make_dataset

    reason = feature_cache_unusable_reason(augment, base_frozen)
    if reason:
        get_logger().info("--feature-cache is not used: %s", reason)
        return None
    train_images = make_dataset(train_paths, train_labels.tolist(), image_size, batch_size, training=False,
                                with_index=True, failures=failures, cache=train_cache)
    val_images = make_dataset(val_paths, val_labels.tolist(), image_size, batch_size, training=False,
                              with_index=True, failures=failures, cache=val_cache)
    return prepare_head_on_features(model, train_images, train_labels, val_images, val_labels,
                                    batch_size, seed)


def prepare_head_on_features(model: tf.keras.Model, train_images: tf.data.Dataset, train_labels: np.ndarray,
                             val_images: tf.data.Dataset, val_labels: np.ndarray, batch_size: int,
                             seed: int) -> HeadOnFeatures | None:
    """Compute this rank's features and compile the head model with model's optimizer.

    model must be compiled for the phase already. train_images and val_images
    must yield (images, labels, indices) over this rank's shards in a fixed
    order (make_dataset with training=False and with_index=True); the labels
    arrays are indexed by those indices.

    Every rank must call this, because the ranks agree by an allreduce. Returns
    None on every rank when some rank's training shard has no decodable image:
    its repeated feature dataset would be empty and that rank could not step.
    """
    log = get_logger()
    started = time.time()
    (train_positions, train_features), (val_positions, val_features) = extract_features(
        model, train_images, val_images)
    seconds = time.time() - started
    (empty_shards,) = allreduce_sum([float(len(train_positions) == 0)], name="feature_cache_empty")
    if empty_shards:
        log.warning("--feature-cache: %d ranks have no decodable training image, so phase 1 trains on "
                    "images instead", int(empty_shards))
        return None

    head = build_head_model(model)
    head.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
    # Keras (2.15) saves a compiled model's loss and metric trackers only once they
    # are built, which fit() does on its first step. The full model takes no step in
    # this phase, so build them here: the checkpoints then have the layout that
    # phase 2 and finish_run load.
    probabilities = tf.zeros((1, int(model.output.shape[-1])), tf.float32)
    model.compiled_loss.build(probabilities)
    model.compiled_metrics.build(probabilities, tf.zeros((1,), tf.int32))
    log.info("--feature-cache: pooled features of %d training and %d validation images on rank 0 in "
             "%.1f s; phase 1 trains the head on them", len(train_positions), len(val_positions), seconds)
    return HeadOnFeatures(
        model=head,
        train=feature_dataset(train_features, train_labels[train_positions], batch_size, training=True,
                              seed=seed),
        val=feature_dataset(val_features, val_labels[val_positions], batch_size, training=False),
        seconds=seconds,
    )
