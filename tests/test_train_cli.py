"""python -m hvdmri.train on bad input: one line naming the problem, non-zero exit, no training."""

import os
import shutil
import subprocess

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
    (["--scratch-lr", "-1"], "--scratch-lr"),
    (["--scratch-lr", "nan"], "--scratch-lr"),
    (["--head-lr", "0"], "--head-lr"),
    (["--finetune-lr", "inf"], "--finetune-lr"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--scratch-bn-momentum", "1"], "--scratch-bn-momentum"),
])
def test_bad_flag_values(flags, fragment):
    result = run_module(["hvdmri.train", *flags])
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_missing_weights_file(phantom_dir, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", str(tmp_path / "w.h5"),
                         "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "0"], cwd=workdir)
    assert_one_line_error(result, "file not found", "w.h5")
    # Found before the default run folder (runs/run-<time>) was made.
    assert list(workdir.iterdir()) == []


def test_failed_start_removes_the_run_folder_it_made(phantom_dir, tmp_path):
    weights = tmp_path / "garbage.weights.h5"
    weights.write_bytes(b"not an HDF5 file")
    run_dir = tmp_path / "runs" / "first"
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", str(weights),
                         "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "0",
                         "--run-dir", str(run_dir)])
    assert_one_line_error(result, "not a ResNet-50", "garbage.weights.h5")
    assert not run_dir.exists()


def test_failed_start_keeps_an_existing_folder(phantom_dir, tmp_path):
    weights = tmp_path / "garbage.weights.h5"
    weights.write_bytes(b"not an HDF5 file")
    run_dir = tmp_path / "mine"
    (run_dir / "logs").mkdir(parents=True)
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", str(weights),
                         "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "0",
                         "--run-dir", str(run_dir)])
    assert result.returncode == 2
    assert (run_dir / "logs").is_dir()


def test_run_dir_that_is_a_file(phantom_dir, tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("notes")
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--run-dir", str(target), *FAST])
    assert_one_line_error(result, "--run-dir", "is a file")
    assert target.read_text() == "notes"


def test_read_only_run_dir(phantom_dir, tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a read-only tmpfs")
    target = tmp_path / "ro"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], check=True)
    try:
        result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--run-dir", str(target / "run"),
                             *FAST])
    finally:
        subprocess.run(["umount", str(target)], check=False)
    assert_one_line_error(result, "--run-dir", "not writable")


def test_missing_exclude_duplicates_folder(phantom_dir, tmp_path):
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--run-dir", str(tmp_path / "run"),
                         "--exclude-duplicates-of", str(tmp_path / "Testing"), *FAST])
    assert_one_line_error(result, "--exclude-duplicates-of", "no such folder")
    assert not (tmp_path / "run").exists()


def test_run_dir_in_use_by_another_training(phantom_dir, tmp_path):
    from hvdmri.runs import lock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = lock_run_dir(run_dir)
    try:
        result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--run-dir", str(run_dir), *FAST])
    finally:
        lock.close()
    assert_one_line_error(result, "in use by another training", f"pid {os.getpid()}")
    assert not (run_dir / "config.json").exists()


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
    # Every rank stops with the one-line error, printed once, instead of a traceback.
    # (horovodrun itself then prints a traceback of its own about the exit codes.)
    worker_lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("[")]
    assert [line for line in worker_lines if "error:" in line] == [
        line for line in worker_lines if line.startswith("[0]<stderr>:hvdmri.train: error: -np 5")]
    assert len([line for line in worker_lines if "error:" in line]) == 1
    assert not [line for line in worker_lines if "Traceback" in line]
