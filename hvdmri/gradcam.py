"""Grad-CAM heat maps: which regions of a slice drove the model's predicted class.

Grad-CAM weights each channel of a convolutional layer's output by the spatial
mean of the class score's gradient over that channel, sums the weighted channels
and keeps the positive part.

The heat map has the layer's grid resolution: conv5_block3_out is the input size
divided by 32, so 7 x 7 at 224 px and a single cell below 64 px.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf

from hvdmri import runs
from hvdmri.data.decode import DecodeError, decode_image, preprocess, resize
from hvdmri.distributed import get_logger
from hvdmri.model import LAST_CONV_LAYER

# Weight of the colour map in the overlay; the rest is the original image.
# Each half of an overlay PNG is at most this many pixels on its longer side.
MAX_OVERLAY_SIDE = 512
OVERLAY_ALPHA = 0.4
GRADCAM_SUFFIX = "_gradcam.png"


class GradCam:
    """Grad-CAM for a Keras classifier whose layer layer_name sits directly in the model."""

    def __init__(self, model: tf.keras.Model, layer_name: str = LAST_CONV_LAYER):
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise ValueError(f"Grad-CAM needs the layer {layer_name!r} of the ResNet-50 that "
                             f"hvdmri.model builds, but the model has no layer of that name") from None
        self.grid_size = tuple(int(side) for side in layer.output.shape[1:3])
        head = model.layers[-1]
        # The class score should be the logit, not the softmax output: a softmax
        # near 1 has a vanishing gradient, which would flatten the heat map. The
        # logits are rebuilt from the last Dense layer's input and weights.
        self._dense_softmax = (isinstance(head, tf.keras.layers.Dense)
                               and head.activation is tf.keras.activations.softmax)
        outputs = [layer.output, head.input if self._dense_softmax else model.output]
        self._head = head
        self._features = tf.keras.Model(model.inputs, outputs, name="gradcam_features")
        self._compute = tf.function(self._compute_eager, reduce_retracing=True)
        if self.grid_size[0] < 2 or self.grid_size[1] < 2:
            get_logger().warning(
                "Grad-CAM on %s has a %dx%d grid at this input size, so every heat map is flat; "
                "models trained on 64 px or larger give spatial heat maps",
                layer_name, *self.grid_size)

    def _compute_eager(self, images, class_indices):
        with tf.GradientTape() as tape:
            conv_output, last = self._features(images, training=False)
            if self._dense_softmax:
                logits = tf.matmul(last, self._head.kernel) + self._head.bias
                probabilities = tf.nn.softmax(logits)
            else:
                logits = last
                probabilities = last
            if class_indices is None:
                class_indices = tf.argmax(probabilities, axis=1, output_type=tf.int32)
            scores = tf.gather(logits, class_indices, axis=1, batch_dims=1)
        gradients = tape.gradient(scores, conv_output)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * conv_output, axis=-1))
        return cam, probabilities, class_indices

    def heatmaps(self, images: np.ndarray,
                 class_indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Compute heat maps for a batch of preprocessed images.

        Args:
            images: float32 [n, size, size, 3], already through decode.preprocess.
            class_indices: the class to explain per image; default the predicted one.

        Returns:
            (heatmaps [n, grid, grid] scaled to 0-1 per image, probabilities [n, classes],
            explained class per image). A heat map with no positive value stays all zero.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        if class_indices is not None:
            class_indices = tf.convert_to_tensor(class_indices, tf.int32)
        cam, probabilities, explained = self._compute(images, class_indices)
        cam = cam.numpy().astype(np.float32)
        peaks = cam.max(axis=(1, 2), keepdims=True)
        cam = np.divide(cam, peaks, out=np.zeros_like(cam), where=peaks > 0)
        return cam, probabilities.numpy(), explained.numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Return the original RGB image beside it blended with the heat map, shape [H, 2W, 3] uint8.

    Images with a side longer than MAX_OVERLAY_SIDE are first shrunk to fit it.

    The heat map is stretched to the original's height and width; that inverts the
    model's square resize, so regions line up even on non-square images.
    """
    height, width = image.shape[:2]
    if max(height, width) > MAX_OVERLAY_SIDE:
        # A scan thousands of pixels wide would make a PNG of many megabytes. The heat
        # map has only a few cells per side, and a smaller copy shows all of them.
        scale = MAX_OVERLAY_SIDE / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    stretched = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    heat8 = np.clip(np.round(stretched * 255.0), 0, 255).astype(np.uint8)
    colored = cv2.cvtColor(cv2.applyColorMap(heat8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 1.0 - alpha, colored, alpha, 0.0)
    return np.hstack([image, blended])


def write_png(path: str | os.PathLike, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with runs.atomic_path(path) as temporary:
        temporary.write_bytes(encoded.tobytes())


def overlay_names(relatives: list[str]) -> list[str]:
    """Map input paths relative to an output folder to unique overlay file names.

    "glioma/a.jpg" becomes "glioma/a_gradcam.png". Where two inputs would share a
    name ("a.jpg" and "a.png" in one folder), each keeps its extension in the name
    ("a_jpg_gradcam.png"). The result depends only on the list, so ranks given
    the same list agree on the names.
    """
    plain = [str(Path(relative).with_suffix("")) + GRADCAM_SUFFIX for relative in relatives]
    seen: dict[str, int] = {}
    for name in plain:
        seen[name] = seen.get(name, 0) + 1
    names = []
    for relative, name in zip(relatives, plain):
        if seen[name] > 1:
            path = Path(relative)
            name = str(path.with_suffix("")) + "_" + path.suffix.lstrip(".").lower() + GRADCAM_SUFFIX
        names.append(name)
    return names


def explain_files(gradcam: GradCam, paths: list[str], out_paths: list[str | os.PathLike],
                  image_size: int, batch_size: int = 16, progress=None) -> list[tuple[str, str]]:
    """Write one Grad-CAM overlay PNG per image file, explaining the predicted class.

    Files are decoded the way training decodes them, then resized to image_size
    and preprocessed, and the overlay is drawn on the decoded original at its own
    size.

    Args:
        progress: optional callable taking the number of files finished in a batch
            (for example tqdm's update).

    Returns:
        (path, reason) for every file that could not be decoded; those get no overlay.
    """
    failed: list[tuple[str, str]] = []
    for start in range(0, len(paths), batch_size):
        originals, targets = [], []
        for path, target in zip(paths[start:start + batch_size], out_paths[start:start + batch_size]):
            try:
                originals.append(decode_image(path))
            except DecodeError as error:
                failed.append((path, str(error)))
                continue
            targets.append(target)
        if originals:
            batch = preprocess(np.stack([resize(image, image_size) for image in originals]))
            heatmaps, _, _ = gradcam.heatmaps(batch)
            for original, heatmap, target in zip(originals, heatmaps, targets):
                write_png(target, overlay(original, heatmap))
        if progress is not None:
            progress(min(batch_size, len(paths) - start))
    return failed
