"""ResNet-50 with a small classification head, weights loading and freezing.

The model is built flat (the base's layers sit directly in the model), so
Grad-CAM and feature extraction can reach any base layer by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from hvdmri.distributed import UsageError
from hvdmri.fused_relu import use_fused_relu

# The last convolutional block of Keras' ResNet-50; Grad-CAM reads its output.
LAST_CONV_LAYER = "conv5_block3_out"
BASE_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")
WEIGHTS_HELP = ("pass --weights PATH with a local ResNet-50 weights file "
                "(resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5), or --weights none "
                "to train from random initialisation")


def build_model(num_classes: int, image_size: int, weights: str | None = "imagenet",
                dropout: float = 0.5, fused_relu: bool | None = None) -> tf.keras.Model:
    """Build ResNet-50 (no top) + global average pooling + Dense 128 ReLU + Dropout + softmax.

    Args:
        weights: "imagenet" (download through Keras), None for random
            initialisation, or the path of a local weights file for the base.
        fused_relu: run the base's ReLU layers as XLA kernels (hvdmri.fused_relu).
            None: when the global Keras policy computes in bfloat16, the only case
            where they are faster.

    Raises:
        UsageError: the weights file is missing or does not fit ResNet-50, or the
            ImageNet download failed.
    """
    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    base = _build_base(inputs, weights)
    x = tf.keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = tf.keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    x = tf.keras.layers.Dropout(dropout, name="head_dropout")(x)
    # Softmax in float32 even under mixed precision: bf16 probabilities lose
    # too many digits for a stable loss and for calibration.
    outputs = tf.keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                    name="predictions")(x)
    model = tf.keras.Model(inputs, outputs, name="resnet50_mri")
    if fused_relu is None:
        fused_relu = tf.keras.mixed_precision.global_policy().compute_dtype == "bfloat16"
    if fused_relu:
        use_fused_relu(model)
    return model


def _build_base(inputs: tf.Tensor, weights: str | None) -> tf.keras.Model:
    if weights not in (None, "imagenet"):
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"--weights: file not found: {path}")
    if weights == "imagenet":
        try:
            return tf.keras.applications.ResNet50(include_top=False, weights="imagenet", input_tensor=inputs)
        except Exception as error:  # Keras' get_file raises a bare Exception on network failures.
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"downloading the ImageNet weights failed ({first_line}); {WEIGHTS_HELP}") from None
    try:
        return tf.keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=inputs)
    except (OSError, ValueError) as error:
        raise UsageError(f"--weights {weights}: not a ResNet-50 (no top) weights file: {error}") from None


def resolve_weights(weights: str) -> str | None:
    """Map the --weights flag to what Keras takes: "imagenet", None or a path."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    return os.path.abspath(weights)


def base_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Return the ResNet-50 layers of the model (everything before the head)."""
    layers = []
    for layer in model.layers:
        if layer.name == "avg_pool":
            break
        layers.append(layer)
    return layers


def set_trainable(model: tf.keras.Model, from_stage: str | None, freeze_batchnorm: bool) -> int:
    """Choose which layers train; return how many base layers do.

    Args:
        from_stage: base layers of this stage and later train (one of BASE_STAGES, e.g.
            "conv5"); None keeps the whole base frozen; "conv1" trains all of it.
        freeze_batchnorm: keep BatchNormalization layers frozen. A frozen BatchNormalization
            layer runs in inference mode in Keras 2, so pretrained statistics are not
            overwritten by the small batches of fine-tuning.
    """
    trainable_stages = set() if from_stage is None else set(BASE_STAGES[BASE_STAGES.index(from_stage):])
    count = 0
    for layer in base_layers(model):
        stage = layer.name.split("_")[0]
        trainable = stage in trainable_stages
        if freeze_batchnorm and isinstance(layer, tf.keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable
        count += int(trainable and bool(layer.weights))
    return count


def set_batchnorm_momentum(model: tf.keras.Model, momentum: float) -> None:
    """Set the moving-average momentum of every BatchNormalization layer.

    Keras' ResNet-50 uses 0.99, which averages over about 100 steps. Trained from
    random weights on a few hundred steps, the moving statistics then trail the
    fast-changing weights and validation collapses to one class; a lower momentum
    lets them follow.
    """
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = momentum
