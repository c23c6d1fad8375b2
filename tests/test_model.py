"""Model construction, weights from a local file, and freezing."""

import numpy as np
import pytest
import tensorflow as tf

from hvdmri.distributed import UsageError
from hvdmri.model import base_layers, build_model, set_trainable


def test_head_and_output_shape():
    model = build_model(4, 64, weights=None)
    assert model.output_shape == (None, 4)
    assert [layer.name for layer in model.layers[-4:]] == ["avg_pool", "head_dense", "head_dropout", "predictions"]
    assert model.get_layer("head_dense").units == 128
    assert model.get_layer("head_dropout").rate == 0.5
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"


def test_weights_loaded_from_local_file(tmp_path):
    # A machine without internet gets its weights from a file: write one the way
    # Keras ships them (a no-top ResNet-50 saved as HDF5) and load it.
    tf.keras.utils.set_random_seed(11)
    reference = tf.keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.h5"
    reference.save_weights(str(path))

    tf.keras.utils.set_random_seed(99)  # a different random start, overwritten by the file
    model = build_model(4, 64, weights=str(path))
    expected = reference.get_layer("conv5_block3_3_conv").get_weights()[0]
    loaded = model.get_layer("conv5_block3_3_conv").get_weights()[0]
    np.testing.assert_array_equal(loaded, expected)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="file not found: .*nope.h5"):
        build_model(4, 64, weights=str(tmp_path / "nope.h5"))


def test_wrong_weights_file_is_rejected(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"this is not HDF5")
    with pytest.raises(UsageError, match="not a ResNet-50"):
        build_model(4, 64, weights=str(path))


def test_failed_download_names_both_ways_out(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.example/resnet50.h5: None -- offline")

    monkeypatch.setattr(tf.keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.data_utils.get_file", offline)
    with pytest.raises(UsageError) as error:
        build_model(4, 64, weights="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "--weights PATH" in message
    assert "--weights none" in message


def test_freezing_keeps_batchnorm_in_inference_mode():
    model = build_model(4, 64, weights=None)
    count = set_trainable(model, "conv5", freeze_batchnorm=True)
    layers = {layer.name: layer for layer in base_layers(model)}
    assert layers["conv5_block1_1_conv"].trainable
    assert not layers["conv4_block6_3_conv"].trainable
    assert not layers["conv5_block1_1_bn"].trainable
    assert count == sum(1 for layer in layers.values() if layer.trainable and layer.weights)
    assert model.get_layer("head_dense").trainable

    assert set_trainable(model, None, freeze_batchnorm=True) == 0
    set_trainable(model, "conv1", freeze_batchnorm=False)
    assert layers["conv1_bn"].trainable
