"""Batched prediction over a rank's shard and gathering the results on every rank.

Training's final validation and evaluation share this code, so each image is
counted exactly once whatever the number of ranks: shards are disjoint, and
results are gathered by image index before any metric is computed.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def predict_shard(model: tf.keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over a dataset that yields (images, labels, indices).

    Returns:
        (indices, probabilities): the index of each decoded image in the shard's
        path list, and its class probabilities (float32, shape [n, classes]).
    """
    predict = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    indices, probabilities = [], []
    for images, _, index in dataset:
        probabilities.append(predict(images).numpy().astype(np.float32))
        indices.append(index.numpy())
    n_classes = int(model.output_shape[-1])
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, n_classes), np.float32)
    return np.concatenate(indices), np.concatenate(probabilities)


def gather_by_index(local_ids: np.ndarray, local_probabilities: np.ndarray,
                    world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Collect every rank's (ids, probabilities) on every rank, sorted by id.

    ids must be global (unique across ranks), e.g. positions in the unsharded list.
    """
    if world_size > 1:
        import horovod.tensorflow as hvd

        parts = hvd.allgather_object((local_ids, local_probabilities), name="gather_predictions")
        local_ids = np.concatenate([ids for ids, _ in parts])
        local_probabilities = np.concatenate([probs for _, probs in parts])
    order = np.argsort(local_ids, kind="stable")
    return local_ids[order], local_probabilities[order]
