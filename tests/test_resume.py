"""Interrupted runs: kill the job mid-training, rerun the same command, check it resumes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HOROVODRUN, clean_env, descendants, horovodrun_argv
from hvdmri.data.synth import write_phantoms

pytestmark = pytest.mark.slow


def history_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def train_command(data: Path, run_dir: Path, epochs: int) -> list[str]:
    return ["-m", "hvdmri.train", "--data", str(data), "--weights", "none", "--image-size", "32",
            "--batch-size", "4", "--scratch-epochs", str(epochs), "--val-fraction", "0.1",
            "--run-dir", str(run_dir)]


def wait_for_epochs(process: subprocess.Popen, run_dir: Path, count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while len(history_epochs(run_dir)) < count:
        assert process.poll() is None, f"training ended before {count} epochs: {process.returncode}"
        assert time.time() < deadline, f"no {count} epochs within {timeout} s"
        time.sleep(0.2)


@pytest.fixture
def data(tmp_path) -> Path:
    # 40 per class: 36 steps per epoch at batch 4, so an epoch lasts long enough
    # to be interrupted in the middle.
    return write_phantoms(tmp_path / "Training", per_class=40, image_size=48, seed=1)


def test_killed_run_resumes_where_it_stopped(tmp_path, data):
    run_dir = tmp_path / "run"
    command = [sys.executable, *train_command(data, run_dir, epochs=4)]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    wait_for_epochs(process, run_dir, 2, timeout=600)
    process.kill()
    process.wait(timeout=60)
    assert not (run_dir / "model.keras").exists()
    completed = json.loads((run_dir / "checkpoints" / "state.json").read_text())["last_epoch"]
    assert completed >= 2

    # A runtime flag may change on resume: here the XLA ReLU kernels are switched off.
    rerun = subprocess.run([*command, "--no-fused-relu"], capture_output=True, text=True, timeout=900,
                           env=clean_env())
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming {run_dir} after epoch {completed} of 4" in rerun.stdout
    first_log = (tmp_path / "first.log").read_text()
    if "precision: mixed_bfloat16" in first_log:
        assert "ReLU and residual Add run as XLA kernels" in first_log
    assert "precision: " in rerun.stdout
    assert "XLA kernels" not in rerun.stdout
    # The optimizer continues from the saved step count, not from 0.
    steps_per_epoch = 36
    assert f"optimizer at step {completed * steps_per_epoch}" in rerun.stdout
    assert history_epochs(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "model.keras").is_file()


def test_changed_settings_do_not_resume(tmp_path, data):
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, *train_command(data, run_dir, epochs=1)], capture_output=True,
                           text=True, timeout=600, env=clean_env())
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "model.keras").unlink()  # as if the run had stopped before its final model
    changed = subprocess.run([sys.executable, *train_command(data, run_dir, epochs=1), "--image-size", "40"],
                             capture_output=True, text=True, timeout=600, env=clean_env())
    assert changed.returncode == 2
    assert "--image-size 32 -> 40" in changed.stderr


def worker_pids(parent: int) -> dict[int, int]:
    """Map rank -> pid for the hvdmri.train processes below one horovodrun process only."""
    found = {}
    for pid in descendants(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hvdmri.train" not in cmdline:
            continue
        for item in environ:
            if item.startswith(b"HOROVOD_RANK="):
                found[int(item.split(b"=", 1)[1])] = pid
    return found


def test_killed_worker_ends_the_job_and_rerun_resumes(tmp_path, data):
    if not HOROVODRUN.exists():
        pytest.skip("horovodrun not installed (run launch/setup.sh)")
    run_dir = tmp_path / "run"
    command = horovodrun_argv(2, train_command(data, run_dir, epochs=4))
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                                   start_new_session=True)
    try:
        wait_for_epochs(process, run_dir, 1, timeout=600)
        pids = worker_pids(process.pid)
        assert 1 in pids, pids
        os.kill(pids[1], signal.SIGKILL)
        started = time.time()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert process.returncode != 0
    assert time.time() - started < 120
    assert "Process 1 exit with status code" in output or "Process name: 1" in output, output[-2000:]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean_env())
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    assert history_epochs(run_dir) == [1, 2, 3, 4]
