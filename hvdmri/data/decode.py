"""The one image decoder that training, evaluation and prediction share.

Every file becomes an 8-bit RGB array the same way, wherever it is read:
- 16-bit images are scaled to 0-255 by their own minimum and maximum (MRI
  intensities have no fixed range, so a fixed divisor would leave most scans black);
- grayscale images are repeated into three channels;
- palette images are expanded to their colours (OpenCV does this on decode);
- an alpha channel is dropped.
"""

from __future__ import annotations

import os

import cv2
import numpy as np


class DecodeError(ValueError):
    """A file that cannot be turned into an image; the message names the file."""


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Raises:
        DecodeError: the file is missing, empty or not a decodable image.
    """
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DecodeError(f"{path}: cannot read file ({error.strerror or error})") from None
    if raw.size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DecodeError(f"{path}: not a decodable image (corrupt, truncated or not JPEG/PNG)")
    return to_rgb8(image)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Convert an OpenCV-decoded array (BGR order, any depth, 1-4 channels) to uint8 RGB."""
    if image.dtype != np.uint8:
        image = _scale_to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DecodeError(f"unsupported number of channels: {channels}")


def _scale_to_uint8(image: np.ndarray) -> np.ndarray:
    values = image.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize to image_size x image_size; INTER_AREA when shrinking avoids aliasing."""
    height, width = image.shape[:2]
    if (height, width) == (image_size, image_size):
        return image
    shrinking = height > image_size or width > image_size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (image_size, image_size), interpolation=interpolation)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode and resize: the (image_size, image_size, 3) uint8 RGB array the model sees."""
    return resize(decode_image(path), image_size)


def preprocess(images):
    """Apply ResNet-50's input preprocessing to RGB values in 0-255 (NumPy or tf tensors).

    Keras' ResNet-50 expects its ImageNet "caffe" convention: channels in BGR order
    with the ImageNet mean subtracted, no scaling. Keeping the library function as
    the single place where this happens is what makes training, evaluation and
    prediction identical.
    """
    from tensorflow.keras.applications.resnet50 import preprocess_input

    if isinstance(images, np.ndarray):
        images = images.astype(np.float32)
    return preprocess_input(images)
