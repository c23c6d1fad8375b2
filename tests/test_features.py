"""Phase 1 on stored base features (--feature-cache): same model, same validation, faster."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from hvdmri.data.decode import load_image, preprocess
from hvdmri.data.listing import CLASS_NAMES
from hvdmri.data.synth import write_phantoms
from hvdmri.features import build_head_model, extract_features, feature_dataset, use_feature_cache
from hvdmri.model import build_model, set_batchnorm_momentum

IMAGE_SIZE = 32


def phantom_arrays(folder: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    images = np.stack([load_image(path, image_size) for path in paths])
    labels = np.array([CLASS_NAMES.index(path.parent.name) for path in paths])
    return images, labels


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory) -> Path:
    """A no-top ResNet-50 weights file whose features tell the phantom classes apart.

    ImageNet weights cannot be downloaded here, and a random base's pooled
    features do not separate the phantoms (a logistic regression on them scored
    about 0.3 in cross-validation). So the base is first trained briefly on a
    phantom set drawn from another seed than the one the tests train on,
    standing in for pretraining on another data set.
    """
    folder = tmp_path_factory.mktemp("pretrain")
    images, labels = phantom_arrays(write_phantoms(folder / "Training", per_class=30, image_size=64, seed=11),
                                    IMAGE_SIZE)
    tf.keras.utils.set_random_seed(5)
    model = build_model(len(CLASS_NAMES), IMAGE_SIZE, weights=None)
    set_batchnorm_momentum(model, 0.9)
    model.compile(tf.keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(preprocess(images), labels, batch_size=16, epochs=6, verbose=0)

    base = tf.keras.applications.ResNet50(include_top=False, weights=None,
                                          input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    for layer in base.layers[1:]:  # all but the input layer, whose name differs
        layer.set_weights(model.get_layer(layer.name).get_weights())
    path = folder / "resnet50_notop.h5"
    base.save_weights(str(path))
    return path


def test_head_model_shares_layers():
    model = build_model(4, IMAGE_SIZE, weights=None)
    head = build_head_model(model)

    for name in ("head_dense", "head_dropout", "predictions"):
        assert head.get_layer(name) is model.get_layer(name)
    images = preprocess(np.random.default_rng(0).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3)))
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(3, np.int32), np.arange(3))).batch(2)
    [(positions, features)] = extract_features(model, dataset)
    np.testing.assert_array_equal(positions, [0, 1, 2])
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(head(features, training=False).numpy(), model(images, training=False).numpy(),
                               rtol=1e-4, atol=1e-6)


def test_training_features_repeat_with_weights():
    features = np.arange(10, dtype=np.float32).reshape(5, 2)
    dataset = feature_dataset(features, np.arange(5), 2, training=True, seed=0)

    batches = list(dataset.take(5))  # two passes over 5 vectors in batches of 2
    assert all(len(batch) == 3 for batch in batches)
    seen = np.concatenate([labels.numpy() for _, labels, _ in batches])
    assert sorted(seen[:5].tolist()) == [0, 1, 2, 3, 4]
    assert all(np.all(weights.numpy() == 1.0) for _, _, weights in batches)


def test_augmentation_keeps_image_path(caplog, monkeypatch):
    model = build_model(4, IMAGE_SIZE, weights=None)
    monkeypatch.setattr(logging.getLogger("hvdmri"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="hvdmri"):
        head = use_feature_cache(model, base_frozen=True, augment=True, image_size=IMAGE_SIZE, batch_size=4,
                                 seed=0, train_paths=[], train_labels=np.zeros(0, np.int32), val_paths=[],
                                 val_labels=np.zeros(0, np.int32))
    assert head is None
    message = caplog.records[-1].getMessage()
    assert message.startswith("--feature-cache is not used: augmentation changes the images")
    assert "--no-augment" in message


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def train(data: Path, weights: Path, run_dir: Path, *extra: str):
    result = run_module(["hvdmri.train", "--data", str(data), "--weights", str(weights),
                         "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--val-fraction", "0.25",
                         "--precision", "float32", "--no-augment", "--head-epochs", "6", "--head-lr", "3e-3",
                         "--run-dir", str(run_dir), *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_head_on_features_then_finetune(tmp_path, pretrained_weights):
    data = write_phantoms(tmp_path / "Training", per_class=20, image_size=64, seed=3)
    # Phase 2 runs at a learning rate too small to move any weight, so its one
    # epoch validates, on images through the full model, the model phase 1 left.
    result = train(data, pretrained_weights, tmp_path / "cached", "--feature-cache",
                   "--finetune-epochs", "1", "--finetune-lr", "1e-12")
    assert "--feature-cache: pooled features of 60 training and 20 validation images" in result.stdout
    history = read_history(tmp_path / "cached")
    assert [row["phase"] for row in history] == ["head"] * 6 + ["finetune"]
    head_last, finetune_first = history[5], history[6]
    assert float(head_last["val_accuracy"]) >= 0.5, history  # chance is 0.25
    # Phase 1 validated the head on features; phase 2 the full model on images.
    assert float(finetune_first["val_accuracy"]) == float(head_last["val_accuracy"])
    assert float(finetune_first["val_loss"]) == pytest.approx(float(head_last["val_loss"]), rel=1e-4)

    # The same phase 1 on images, for comparison.
    train(data, pretrained_weights, tmp_path / "images", "--finetune-epochs", "0")
    plain_last = read_history(tmp_path / "images")[-1]
    assert float(plain_last["val_accuracy"]) >= 0.5
    assert abs(float(plain_last["val_accuracy"]) - float(head_last["val_accuracy"])) <= 0.25
