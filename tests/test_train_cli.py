"""python -m hvdmri.train on bad input: one line naming the problem, non-zero exit, no training."""

import shutil

import numpy as np
import pytest

from conftest import horovodrun, run_module, write_image
from hvdmri.config import TrainConfig, parse_args
from hvdmri.data.listing import CLASS_NAMES
from hvdmri.distributed import UsageError
from hvdmri.train import plan_phases

FAST = ["--weights", "none", "--image-size", "32", "--scratch-epochs", "1"]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert "epoch 1/" not in result.stdout


def test_missing_data_folder(tmp_path):
    result = run_module(["hvdmri.train", "--data", str(tmp_path / "absent"), *FAST])
    assert_one_line_error(result, "data folder not found", str(tmp_path / "absent"))


def test_empty_data_folder(tmp_path):
    result = run_module(["hvdmri.train", "--data", str(tmp_path), *FAST])
    assert_one_line_error(result, "class folder missing", "glioma")


def test_missing_class_folder(phantom_dir):
    shutil.rmtree(phantom_dir / "meningioma")
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), *FAST])
    assert_one_line_error(result, "class folder missing", "meningioma")


def test_folder_without_images(tmp_path):
    for name in CLASS_NAMES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("nothing")
    result = run_module(["hvdmri.train", "--data", str(tmp_path), *FAST])
    assert_one_line_error(result, "no usable images", str(tmp_path))


@pytest.mark.parametrize("flags, fragment", [
    (["--precision", "float16"], "--precision"),
    (["--image-size", "16"], "--image-size"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--finetune-from", "conv9"], "--finetune-from"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flag_values(flags, fragment):
    result = run_module(["hvdmri.train", *flags])
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_missing_weights_file(phantom_dir, tmp_path):
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", str(tmp_path / "w.h5"),
                         "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "0"])
    assert_one_line_error(result, "file not found", "w.h5")


def test_no_epochs_is_rejected():
    with pytest.raises(UsageError, match="nothing to train"):
        plan_phases(TrainConfig(weights="none", scratch_epochs=0))


def test_phases_follow_the_weights():
    assert [p.name for p in plan_phases(parse_args(["--weights", "none"]))] == ["scratch"]
    names = [p.name for p in plan_phases(parse_args(["--full-epochs", "2"]))]
    assert names == ["head", "finetune", "full"]
    head = plan_phases(parse_args([]))[0]
    assert head.train_from is None
    assert head.freeze_batchnorm


@pytest.mark.slow
def test_more_workers_than_images_fails_before_training(tmp_path):
    for name in CLASS_NAMES:
        write_image(tmp_path / name / "one.png", np.full((32, 32), 100, np.uint8))
    result = horovodrun(5, ["-m", "hvdmri.train", "--data", str(tmp_path), "--val-fraction", "0", *FAST],
                        timeout=300)
    assert result.returncode != 0
    assert "-np 5 is larger than the 4 training images" in result.stdout + result.stderr
    assert "epoch 1/" not in result.stdout
