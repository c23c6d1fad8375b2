"""End-to-end training runs: 2 workers under horovodrun, and one worker from a weights file."""

import csv
import json

import numpy as np
import pytest

from conftest import horovodrun, rank_lines, run_module

pytestmark = pytest.mark.slow


def test_two_workers_learn_the_phantoms(tmp_path, monkeypatch):
    # The default data set: phantoms generated into this test's own cache folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = horovodrun(2, ["-m", "hvdmri.train", "--weights", "none", "--image-size", "64",
                            "--scratch-epochs", "8", "--run-dir", str(run_dir)], timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for name in ("config.json", "classes.json", "history.csv", "model.keras", "metrics.json",
                 "checkpoints/last.weights.h5", "checkpoints/best.weights.h5"):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in history] == list(range(1, 9))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["support"] == 80
    assert metrics["accuracy"] >= 0.5, metrics  # chance is 0.25
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]

    # Only rank 0 logs epochs, steps and results.
    rank0 = "\n".join(rank_lines(result.stdout, 0))
    rank1 = "\n".join(rank_lines(result.stdout, 1))
    assert "epoch 8/8 [scratch]" in rank0
    assert "validation: accuracy" in rank0
    assert "epoch " not in rank1
    assert "step " not in rank1
    assert "INFO" not in rank1


def test_one_worker_trains_from_a_weights_file(tmp_path, phantom_dir):
    import tensorflow as tf

    from hvdmri.model import build_model

    # A no-top ResNet-50 weights file, as a cluster without internet would hold.
    tf.keras.utils.set_random_seed(5)
    base = tf.keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights_file = tmp_path / "resnet50_notop.h5"
    base.save_weights(str(weights_file))

    run_dir = tmp_path / "run"
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", str(weights_file),
                         "--image-size", "32", "--batch-size", "8", "--head-epochs", "1",
                         "--finetune-epochs", "1", "--val-fraction", "0.25", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "phase 1/2 'head'" in result.stdout
    assert "phase 2/2 'finetune'" in result.stdout

    # conv1 stays frozen in both phases (phase 2 trains conv5 only), so the saved
    # model must still hold the file's weights there.
    model = tf.keras.models.load_model(run_dir / "model.keras", compile=False)
    np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0],
                                  base.get_layer("conv1_conv").get_weights()[0])
    # The last epoch (phase 2) has trained conv5. The final model may hold an
    # earlier, better epoch from phase 1, so read the last checkpoint instead.
    last = build_model(4, 32, weights=None)
    last.load_weights(str(run_dir / "checkpoints" / "last.weights.h5"))
    assert not np.array_equal(last.get_layer("conv5_block3_3_conv").get_weights()[0],
                              base.get_layer("conv5_block3_3_conv").get_weights()[0])
