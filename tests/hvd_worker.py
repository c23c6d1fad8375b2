"""Checks that need several ranks; run by test_horovod.py under horovodrun.

Each check prints one line "RESULT <json>" per rank for the test to compare.
"""

import hashlib
import json
import sys

import numpy as np


def report(**values):
    import horovod.tensorflow as hvd

    print("RESULT " + json.dumps({"rank": hvd.rank(), **values}), flush=True)


def check_split():
    import horovod.tensorflow as hvd

    from hvdmri.data.split import stratified_split

    hvd.init()
    labels = [i % 4 for i in range(103)]
    train, val = stratified_split(labels, 0.1, seed=42)
    digest = hashlib.sha256(train.tobytes() + b"|" + val.tobytes()).hexdigest()
    report(digest=digest, val=len(val))


def check_uneven_shards(folder):
    """7 images, 2 workers, batch 3: both ranks must run the same steps and finish."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hvdmri.data.listing import list_images
    from hvdmri.data.pipeline import make_dataset
    from hvdmri.data.split import shard, steps_per_epoch

    hvd.init()
    listing = list_images(folder)
    assert len(listing) == 7, len(listing)
    mine = shard(np.arange(7), hvd.rank(), hvd.size())
    dataset = make_dataset([listing.absolute(listing.paths[i]) for i in mine],
                           [listing.labels[i] for i in mine], 32, 3, training=True, seed=hvd.rank())
    steps = steps_per_epoch(7, hvd.size(), 3)

    model = tf.keras.Sequential([tf.keras.Input((32, 32, 3)), tf.keras.layers.GlobalAveragePooling2D(),
                                 tf.keras.layers.Dense(4, activation="softmax")])
    model.compile(hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01)), "sparse_categorical_crossentropy")
    counted = []
    count_batches = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: counted.append(batch))
    model.fit(dataset, epochs=2, steps_per_epoch=steps, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), count_batches])
    report(shard_size=len(mine), steps_per_epoch=steps, batches_run=len(counted))


def check_global_mean():
    """Rank 0 gets 3 of 4 right, rank 1 gets 1 of 3 right: every rank must report 4/7."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hvdmri.callbacks import GlobalValidation, global_mean

    hvd.init()
    if hvd.rank() == 0:
        predicted, labels = [0, 1, 2, 3], [0, 1, 2, 0]
    else:
        predicted, labels = [1, 2, 3], [1, 0, 0]
    # A model whose input is the class it predicts, so the correct predictions are fixed.
    inputs = tf.keras.Input((1,), dtype=tf.int32)
    outputs = tf.keras.layers.Lambda(lambda x: tf.one_hot(x[:, 0], 4))(inputs)
    model = tf.keras.Model(inputs, outputs)
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.array(predicted, np.int32)[:, None], np.array(labels, np.int32))).batch(2)
    callback = GlobalValidation(dataset)
    callback.set_model(model)
    logs = {}
    callback.on_epoch_end(0, logs)
    correct = sum(p == y for p, y in zip(predicted, labels))
    report(val_accuracy=logs["val_accuracy"], mean=global_mean(correct, len(labels), "test_mean"),
           local_rate=correct / len(labels))


def check_batchnorm_average():
    """Ranks start with different moving statistics and must end with their mean."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hvdmri.callbacks import AverageBatchNormStatistics

    hvd.init()
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.BatchNormalization()])
    layer = model.layers[0]
    layer.moving_mean.assign([1.0 + hvd.rank()] * 3)  # rank 0: 1, rank 1: 2
    layer.moving_variance.assign([4.0 * (hvd.rank() + 1)] * 3)  # rank 0: 4, rank 1: 8
    callback = AverageBatchNormStatistics()
    callback.set_model(model)
    callback.on_epoch_end(0)
    report(mean=layer.moving_mean.numpy().tolist(), variance=layer.moving_variance.numpy().tolist())


if __name__ == "__main__":
    check = sys.argv[1]
    {"split": check_split, "uneven": lambda: check_uneven_shards(sys.argv[2]),
     "mean": check_global_mean, "batchnorm": check_batchnorm_average}[check]()
