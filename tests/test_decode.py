"""Decoding and preprocessing: one path for training, evaluation and prediction."""

import numpy as np
import pytest

from conftest import write_image
from hvdmri.data.decode import DecodeError, decode_image, load_image, preprocess

# Keras' ResNet-50 "caffe" preprocessing: RGB -> BGR, then subtract the ImageNet
# BGR mean (103.939, 116.779, 123.68). A pure red RGB pixel (255, 0, 0) becomes
# B = 0 - 103.939, G = 0 - 116.779, R = 255 - 123.68.
RED_PREPROCESSED = np.array([-103.939, -116.779, 131.32], np.float32)


@pytest.fixture
def red_png(tmp_path):
    bgr_red = np.zeros((20, 30, 3), np.uint8)
    bgr_red[..., 2] = 255  # OpenCV writes BGR: channel 2 is red
    return write_image(tmp_path / "red.png", bgr_red)


def test_decode_returns_rgb(red_png):
    image = decode_image(red_png)
    assert image.dtype == np.uint8
    assert image.shape == (20, 30, 3)
    assert image[0, 0].tolist() == [255, 0, 0]


def test_preprocess_exact_values_on_one_colour_image(red_png):
    values = preprocess(load_image(red_png, 32))
    assert values.shape == (32, 32, 3)
    np.testing.assert_allclose(values[5, 5], RED_PREPROCESSED, atol=1e-4)
    np.testing.assert_allclose(values.reshape(-1, 3).min(axis=0), RED_PREPROCESSED, atol=1e-4)


def test_pipeline_matches_direct_preprocessing(red_png, tmp_path):
    from hvdmri.data.pipeline import make_dataset

    gray = write_image(tmp_path / "gray.jpg", np.full((40, 40), 90, np.uint8))
    batches = list(make_dataset([str(red_png), str(gray)], [0, 1], 32, 2, training=False))
    assert len(batches) == 1
    images, labels = batches[0]
    np.testing.assert_allclose(images.numpy()[0], preprocess(load_image(red_png, 32)), atol=1e-4)
    np.testing.assert_allclose(images.numpy()[1], preprocess(load_image(gray, 32)), atol=1e-4)
    assert labels.numpy().tolist() == [0, 1]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = write_image(tmp_path / "gray.png", np.full((8, 8), 77, np.uint8))
    image = decode_image(path)
    assert image.shape == (8, 8, 3)
    assert (image == 77).all()


def test_16_bit_is_scaled_by_its_own_range(tmp_path):
    raw = np.zeros((4, 4), np.uint16)
    raw[0, 0], raw[1, 1] = 1000, 3000  # min 0, max 3000
    image = decode_image(write_image(tmp_path / "deep.png", raw))
    assert image.dtype == np.uint8
    assert image[1, 1].tolist() == [255, 255, 255]
    assert image[0, 0].tolist() == [85, 85, 85]  # round(1000 * 255 / 3000)
    assert image[2, 2].tolist() == [0, 0, 0]


def test_alpha_channel_is_dropped(tmp_path):
    bgra = np.zeros((6, 6, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    bgra[..., 3] = 10  # nearly transparent: alpha is ignored, not blended
    image = decode_image(write_image(tmp_path / "rgba.png", bgra))
    assert image.shape == (6, 6, 3)
    assert image[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"hello, not an image", "not a decodable image"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 20, "not a decodable image"),
])
def test_bad_files_raise_with_the_path(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=message) as error:
        decode_image(path)
    assert str(path) in str(error.value)


def test_pipeline_drops_undecodable_files(tmp_path, red_png):
    from hvdmri.data.pipeline import make_dataset

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    batches = list(make_dataset([str(red_png), str(truncated)], [0, 1], 32, 4, training=False,
                                with_index=True))
    assert [index for _, _, index in batches][0].numpy().tolist() == [0]
