"""Grad-CAM on an untrained 64 px ResNet-50: heat maps, overlay PNGs and their names."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image
from hvdmri.data.decode import decode_image, load_image, preprocess
from hvdmri.gradcam import MAX_OVERLAY_SIDE, OVERLAY_ALPHA, GradCam, explain_files, overlay, overlay_names
from hvdmri.model import build_model

IMAGE_SIZE = 64  # the smallest input whose conv5 grid (input / 32) has more than one cell


@pytest.fixture(scope="module")
def model():
    tf.keras.utils.set_random_seed(7)
    return build_model(4, IMAGE_SIZE, weights=None)


@pytest.fixture(scope="module")
def gradcam(model):
    return GradCam(model)


def scan(height: int, width: int, seed: int) -> np.ndarray:
    """A grey image with a bright disc off centre and some noise, as 8-bit BGR."""
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 10, (height, width)).clip(0, 255)
    rows, columns = np.mgrid[0:height, 0:width]
    disc = (rows - height * 0.3) ** 2 + (columns - width * 0.6) ** 2 < (min(height, width) * 0.2) ** 2
    image[disc] = 220
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)


def test_heatmaps_shape_range_and_class(model, gradcam, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", scan(64, 64, i)) for i in range(3)]
    batch = preprocess(np.stack([load_image(path, IMAGE_SIZE) for path in paths]))
    heatmaps, probabilities, explained = gradcam.heatmaps(batch)

    assert gradcam.grid_size == (2, 2)
    assert heatmaps.shape == (3, 2, 2)
    assert heatmaps.min() >= 0.0
    assert heatmaps.max() <= 1.0
    expected = model(batch, training=False).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(explained, expected.argmax(axis=1))


def test_heatmaps_for_requested_class(gradcam, tmp_path):
    path = write_image(tmp_path / "a.png", scan(64, 64, 0))
    batch = preprocess(load_image(path, IMAGE_SIZE)[None])
    _, _, explained = gradcam.heatmaps(batch, class_indices=np.array([3]))
    assert explained.tolist() == [3]


@pytest.mark.parametrize("height, width", [(64, 64), (90, 120), (200, 150)])
def test_overlay_png_per_image(gradcam, tmp_path, height, width):
    source = write_image(tmp_path / "in" / "scan.png", scan(height, width, height))
    target = tmp_path / "out" / "scan_gradcam.png"

    failed = explain_files(gradcam, [str(source)], [target], IMAGE_SIZE)

    assert failed == []
    assert target.is_file()
    written = decode_image(target)
    # Original on the left, overlay on the right, both at the original's size.
    assert written.shape == (height, 2 * width, 3)
    original = decode_image(source)
    np.testing.assert_array_equal(written[:, :width], original)
    # Undo the blend to get the colour-mapped heat map back: it must vary over the image.
    colour = (written[:, width:].astype(float) - (1 - OVERLAY_ALPHA) * original) / OVERLAY_ALPHA
    assert np.ptp(colour.mean(axis=2)) > 20


def test_heat_map_not_constant(gradcam, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", scan(64, 64, i)) for i in range(4)]
    batch = preprocess(np.stack([load_image(path, IMAGE_SIZE) for path in paths]))
    heatmaps, _, _ = gradcam.heatmaps(batch)
    for heatmap in heatmaps:
        assert np.ptp(heatmap) > 0.05, heatmap


def test_undecodable_file_reported_not_drawn(gradcam, tmp_path):
    good = write_image(tmp_path / "good.png", scan(64, 64, 1))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)
    targets = [tmp_path / "out" / "good_gradcam.png", tmp_path / "out" / "bad_gradcam.png"]

    failed = explain_files(gradcam, [str(good), str(bad)], targets, IMAGE_SIZE)

    assert [path for path, _ in failed] == [str(bad)]
    assert "not a decodable image" in failed[0][1]
    assert targets[0].is_file()
    assert not targets[1].exists()


def test_overlay_stretches_heat_map(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    heatmap = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    result = overlay(image, heatmap)
    assert result.shape == (30, 80, 3)
    # Top right of the heat map is hot (red in the jet colour map), bottom left is cold (blue).
    right = result[:, 40:].astype(int)
    assert right[0, -1, 0] > right[0, -1, 2]
    assert right[-1, 0, 2] > right[-1, 0, 0]


def test_overlay_of_a_large_scan_is_shrunk(tmp_path):
    image = np.zeros((2000, 1000, 3), np.uint8)
    result = overlay(image, np.ones((3, 3), np.float32))
    assert result.shape == (MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE, 3)


def test_overlay_names_unique():
    names = overlay_names(["glioma/a.jpg", "glioma/a.png", "glioma/b.jpg", "notumor/a.jpg"])
    assert names == ["glioma/a_jpg_gradcam.png", "glioma/a_png_gradcam.png", "glioma/b_gradcam.png",
                     "notumor/a_gradcam.png"]
    assert len(set(names)) == len(names)


def test_model_without_layer_rejected():
    inputs = tf.keras.Input((8, 8, 3))
    outputs = tf.keras.layers.Dense(2, activation="softmax")(tf.keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="conv5_block3_out"):
        GradCam(tf.keras.Model(inputs, outputs))


def test_small_input_has_one_cell_grid():
    tf.keras.utils.set_random_seed(1)
    small = build_model(4, 32, weights=None)
    assert GradCam(small).grid_size == (1, 1)
