"""Elastic training: a worker is lost or a host leaves and returns, and the run still finishes.

One-slot loopback "hosts" (127.0.0.2-4, one sshd) each run one worker, started by
launch/cluster.sh --elastic through horovodrun's host discovery. Horovod blacklists
the host of a failed worker, so each worker needs a host of its own for the job to
go on with the others.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from cluster_fixtures import SSH_BINARIES, require_tools, sshd
from conftest import REPO, clean_env, run_module

CLUSTER = REPO / "launch" / "cluster.sh"
DISCOVER = REPO / "launch" / "discover_hosts.sh"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
EPOCHS = 5


def discover(hostfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DISCOVER), str(hostfile)], capture_output=True, text=True, timeout=30)


def test_discovery_lists_hosts_and_slots(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# lab nodes\nnode1 slots=1\n\n  node2 slots=4   # the big one\n")
    result = discover(hostfile)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["node1:1", "node2:4"]


@pytest.mark.parametrize("line", ["node1", "node1 slots=0", "node1 slots=two", "node1 slots=1 extra"])
def test_discovery_rejects_bad_line(tmp_path, line):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"node0 slots=1\n{line}\n")
    result = discover(hostfile)
    assert result.returncode == 1
    assert "line 2: expected \"host slots=N\"" in result.stderr
    assert line in result.stderr


def test_discovery_missing_hostfile(tmp_path):
    result = discover(tmp_path / "absent.txt")
    assert result.returncode == 1
    assert "not found or not readable" in result.stderr


def test_cluster_elastic_dry_run(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=2\n")
    result = subprocess.run(["bash", str(CLUSTER), "--skip-preflight", "--dry-run", "--elastic", "--min-np", "1",
                             "--max-np", "3", str(hostfile), "--weights", "none"],
                            capture_output=True, text=True, timeout=120, env=clean_env(HVDMRI_VENV=sys.prefix))
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert "--min-np 1 " in command
    assert "--max-np 3 " in command
    assert "--host-discovery-script" in command
    assert str(DISCOVER) in command
    assert "-hostfile" not in command
    assert command.rstrip().endswith("--weights none --elastic")


def test_cluster_elastic_flag_errors(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=2\n")
    result = subprocess.run(["bash", str(CLUSTER), "--elastic", "--min-np", "3", "--max-np", "2", str(hostfile)],
                            capture_output=True, text=True, timeout=60, env=clean_env(HVDMRI_VENV=sys.prefix))
    assert result.returncode == 2
    assert "--min-np 3 is larger than --max-np 2" in result.stderr


def test_elastic_rejects_cache_dir(tmp_path):
    result = run_module(["hvdmri.train", "--elastic", "--cache-dir", str(tmp_path / "cache"), "--weights", "none",
                         "--run-dir", str(tmp_path / "run")], timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--cache-dir cannot be used with --elastic" in result.stderr
    assert not (tmp_path / "run").exists()


def worker_with_rank(rank: int, run_dir: Path):
    """Return this run's training process of rank (sshd, not the launcher, started it), or None."""
    import psutil

    for process in psutil.process_iter():
        try:
            if (str(run_dir) in " ".join(process.cmdline())
                    and process.environ().get("HOROVOD_RANK") == str(rank)
                    and "hvdmri.train" in process.cmdline()):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@dataclass
class ElasticJob:
    """A running launch/cluster.sh --elastic job and the files it reads and writes."""

    launcher: subprocess.Popen
    hostfile: Path
    run_dir: Path
    log_path: Path

    def wait_for(self, path: Path, text: str, seconds: float = 600) -> None:
        """Wait until the file at path contains text; fail when the job ends or time runs out first."""
        deadline = time.monotonic() + seconds
        while not path.is_file() or text not in path.read_text():
            output = self.log_path.read_text()
            assert self.launcher.poll() is None, f"the job ended before '{text}' in {path}:\n{output}"
            assert time.monotonic() < deadline, f"no '{text}' in {path} within {seconds} s:\n{output}"
            time.sleep(0.2)

    def history_epochs(self) -> list[int]:
        with open(self.run_dir / "history.csv", newline="") as handle:
            return [int(row["epoch"]) for row in csv.DictReader(handle)]


@contextlib.contextmanager
def elastic_job(folder: Path, hosts: tuple[str, ...], min_np: int, epochs: int) -> Iterator[ElasticJob]:
    """Start an elastic run with one slot on each of hosts (sshd on loopback); kill it on exit if still running."""
    require_tools(SSH_BINARIES, "openssh-server")
    from hvdmri.data.synth import write_phantoms

    data = write_phantoms(folder / "Training", per_class=8, image_size=32, seed=3)
    hostfile = folder / "hosts.txt"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in hosts))
    run_dir = folder / "run"
    log_path = folder / "launch.log"
    with sshd(folder / "sshd", addresses=hosts) as server, open(log_path, "w") as log:
        launcher = subprocess.Popen(
            ["bash", str(CLUSTER), "--skip-preflight", "--elastic", "--min-np", str(min_np),
             "--max-np", str(len(hosts)), "--network-interface", "lo", "-p", str(server.port),
             "-i", str(server.key), "--start-timeout", "60", str(hostfile), "--data", str(data),
             "--run-dir", str(run_dir), "--weights", "none", "--image-size", "32", "--batch-size", "4",
             "--scratch-epochs", str(epochs), "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder,
            env=clean_env(HVDMRI_VENV=sys.prefix), start_new_session=True)
        try:
            yield ElasticJob(launcher, hostfile, run_dir, log_path)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(30)


@pytest.mark.slow
def test_lost_worker_training_continues(tmp_path):
    with elastic_job(tmp_path, HOSTS, min_np=2, epochs=EPOCHS) as job:
        # Once epoch 1 is in the history, kill rank 0 early in epoch 2: the hardest
        # loss, because another worker must then take over the run folder.
        job.wait_for(job.run_dir / "history.csv", "\n1,scratch,")
        time.sleep(1)
        victim = worker_with_rank(0, job.run_dir)
        assert victim is not None, "rank 0's training process not found"
        victim.send_signal(signal.SIGKILL)
        status = job.launcher.wait(timeout=900)
    run_dir, log_path = job.run_dir, job.log_path

    output = log_path.read_text()
    assert status == 0, output
    assert "elastic: world_size=3 from epoch 1 " in output
    # horovodrun prefixes each line with the worker's first rank: rank 0 is gone, so
    # a former rank 1 or 2 logs from the reset on.
    resumed = [line for line in output.splitlines() if "elastic: world_size=2 from epoch" in line]
    assert resumed, output
    assert not resumed[0].startswith("[0]<"), resumed[0]
    assert "training finished" in output
    assert job.history_epochs() == list(range(1, EPOCHS + 1))
    assert (run_dir / "model.keras").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["support"] > 0
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 3


@pytest.mark.slow
def test_removed_host_rejoins(tmp_path):
    hosts = HOSTS[:2]
    # Enough epochs that the job is still training when the new worker has started.
    epochs = 30
    with elastic_job(tmp_path, hosts, min_np=1, epochs=epochs) as job:
        job.wait_for(job.run_dir / "history.csv", "\n1,scratch,")
        # Taking a host out of the hostfile ends its worker at the next epoch end ...
        job.hostfile.write_text(f"{hosts[0]} slots=1\n")
        job.wait_for(job.log_path, "elastic: world_size=1 from epoch")
        # ... and putting it back starts a new worker there, which receives the plan,
        # weights and optimizer state from the others.
        job.hostfile.write_text("".join(f"{host} slots=1\n" for host in hosts))
        job.wait_for(job.log_path, "elastic: the workers changed, world_size=2 now")
        status = job.launcher.wait(timeout=900)

    output = job.log_path.read_text()
    assert status == 0, output
    shrunk = output.index("elastic: world_size=1 from epoch")
    assert "elastic: world_size=2 from epoch" in output[shrunk:]
    assert job.history_epochs() == list(range(1, epochs + 1))
    assert (job.run_dir / "model.keras").is_file()
