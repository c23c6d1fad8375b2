"""Cluster launch: hostfiles, pre-flight, horovodrun over ssh, SLURM, and a worker that dies.

The ssh tests start sshd on loopback addresses (127.0.0.2 and up) and train through
launch/cluster.sh exactly as on a lab network. The SLURM test starts a one-node
cluster in a private network namespace. See cluster_fixtures.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_fixtures import SLURM_BINARIES, SSH_BINARIES, free_port, require_tools, slurm_cluster, sshd
from conftest import REPO, clean_env, rank_lines
from hvdmri.memory import MEMORY_MODEL_GIB
from hvdmri.preflight import (HostEntry, HostfileError, HostReport, Settings, check_interfaces, estimate_worker_memory_gib,
                              parse_hostfile)

CLUSTER = REPO / "launch" / "cluster.sh"
PREFLIGHT = REPO / "launch" / "preflight.sh"
SMOKE = REPO / "launch" / "smoke.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
FAST = ["--weights", "none", "--image-size", "32", "--scratch-epochs", "1", "--batch-size", "8"]
# Long enough that a worker can be killed while training is still running.
LONG = ["--weights", "none", "--image-size", "32", "--scratch-epochs", "40", "--batch-size", "8"]
START_TIMEOUT = 30


def launcher_env(**extra: str) -> dict:
    """The test environment, with launch scripts using this test's Python environment."""
    return clean_env(HVDMRI_VENV=sys.prefix, **extra)


def run_script(script: Path, args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=launcher_env(**env), stdin=subprocess.DEVNULL)


def write_hostfile(folder: Path, text: str, name: str = "hosts.txt") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def fail_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("FAIL")]


def assert_not_started(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cluster.sh: running:" not in output
    assert "Horovod ready" not in output
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------
# Hostfiles and scripts without training
# ---------------------------------------------------------------------------------

def test_example_hostfiles_parse():
    lab = parse_hostfile(REPO / "hostfiles" / "lab-4x8gb.txt")
    assert [entry.host for entry in lab] == ["node1", "node2", "node3", "node4"]
    assert [entry.slots for entry in lab] == [1, 1, 1, 1]
    local = parse_hostfile(REPO / "hostfiles" / "localhost.txt")
    assert [(entry.host, entry.slots) for entry in local] == [("localhost", 2)]


@pytest.mark.parametrize("script", [CLUSTER, PREFLIGHT, SMOKE, SBATCH], ids=lambda path: path.name)
def test_script_help_opens_with_example(script):
    first_comment = script.read_text().splitlines()[1]
    assert first_comment.startswith("# ")
    assert "launch/" in first_comment
    result = run_script(script, ["--help"], cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == first_comment[2:]


def test_memory_estimate_grows_with_batch_and_size():
    # hvdmri/memory.py's float32 fit, a + b * 16, the larger of the two precisions.
    fixed, per_image = MEMORY_MODEL_GIB["float32"]
    assert estimate_worker_memory_gib(16, 224) == pytest.approx(fixed + per_image * 16)
    assert estimate_worker_memory_gib(16, 224, "mixed_bfloat16") < estimate_worker_memory_gib(16, 224, "float32")
    assert estimate_worker_memory_gib(16, 96) < estimate_worker_memory_gib(16, 224)
    assert estimate_worker_memory_gib(8, 224) < estimate_worker_memory_gib(16, 224)


BAD_HOSTFILES = [
    ("syntax", "localhost slots=1\nnode2 slot=1\n", "node2", 2, "expected 'HOST slots=N'"),
    ("missing slots", "localhost\n", "localhost", 1, "expected 'HOST slots=N'"),
    ("slots not a number", "localhost slots=two\n", "localhost", 1, "slots must be a positive integer, got 'two'"),
    ("zero slots", "localhost slots=0\n", "localhost", 1, "slots must be a positive integer, got '0'"),
    ("negative slots", "localhost slots=-1\n", "localhost", 1, "slots must be a positive integer, got '-1'"),
    ("duplicate host", "# lab\nlocalhost slots=1\nlocalhost slots=1\n", "localhost", 3,
     "duplicate host 'localhost': already listed on line 2"),
    ("invalid name", "node:1 slots=1\n", "node:1", 1, "host name 'node:1' is invalid"),
]


@pytest.mark.parametrize("interfaces", [[], ["eth0"]])
def test_interface_verdict_names_unprobed_host(interfaces):
    settings = Settings(python="python3", ssh_port=None, ssh_identity_file=None, ssh_timeout=5, interfaces=interfaces,
                        data=None, run_dir="runs/x", workdir="/tmp", batch_size=16, image_size=224, threads=None,
                        worker_memory_gib=2.0)
    reports = []
    for number, host in enumerate(("node1", "node2", "node3"), start=1):
        report = HostReport(HostEntry(host, 1, number, f"{host} slots=1"), local=False)
        if host != "node3":
            report.facts = {"machine_id": host, "interfaces": {"lo": ["127.0.0.1"], "eth0": [f"10.0.0.{number}"]}}
        reports.append(report)
    check_interfaces(reports, settings)
    for report in reports[:2]:
        [(status, check, detail)] = report.verdicts
        assert (status, check) == ("OK", "interface")
        assert "eth0" in detail
        assert detail.endswith("; not checked on node3, whose probe failed")
    assert reports[2].verdicts == []


@pytest.mark.parametrize("text, host, line, reason", [case[1:] for case in BAD_HOSTFILES],
                         ids=[case[0] for case in BAD_HOSTFILES])
def test_bad_hostfile_stops_launch(tmp_path, text, host, line, reason):
    hostfile = write_hostfile(tmp_path, text)
    run_dir = tmp_path / "run"
    result = run_script(CLUSTER, [hostfile, "--run-dir", run_dir, *FAST], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    failures = fail_lines(result)
    assert len(failures) == 1, result.stderr
    assert failures[0].startswith(f"FAIL  {host}  hostfile  {hostfile} line {line} "), failures[0]
    assert reason in failures[0]
    assert_not_started(result, run_dir)


def test_empty_hostfile_stops_launch(tmp_path):
    hostfile = write_hostfile(tmp_path, "# no hosts yet\n\n")
    result = run_script(CLUSTER, [hostfile, *FAST], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert f"FAIL  -  hostfile  {hostfile}: no hosts listed" in result.stderr
    assert_not_started(result, tmp_path / "runs")


def test_missing_hostfile_stops_launch(tmp_path):
    result = run_script(CLUSTER, [tmp_path / "absent.txt", *FAST], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "cannot read the hostfile: No such file or directory" in result.stderr


def test_parse_reports_every_bad_line(tmp_path):
    hostfile = write_hostfile(tmp_path, "a slots=1\nb slots=x\nc\na slots=2\n")
    with pytest.raises(HostfileError) as caught:
        parse_hostfile(hostfile)
    assert [problem.line_number for problem in caught.value.problems] == [2, 3, 4]


def test_launch_option_errors(tmp_path):
    result = run_script(CLUSTER, ["--no-such-option", "hosts.txt"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "unknown option '--no-such-option'" in result.stderr
    key = tmp_path / "my key"
    key.write_text("not a key")
    result = run_script(CLUSTER, ["-i", key, "hosts.txt"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "contains a space" in result.stderr


def test_sbatch_outside_slurm_job(tmp_path):
    result = run_script(SBATCH, ["--data", tmp_path], cwd=tmp_path, timeout=60, SLURM_JOB_ID="", SLURM_JOB_NODELIST="")
    assert result.returncode == 2
    assert "not inside a SLURM job" in result.stderr


def test_dry_run_counts_slots(tmp_path, phantom_dir):
    hostfile = write_hostfile(tmp_path, "# one machine\nlocalhost slots=2   # both cores\n")
    result = run_script(CLUSTER, ["--dry-run", "--start-timeout", "45", hostfile, "--data", phantom_dir, *FAST],
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cluster.sh: 1 host(s), 2 worker(s)" in result.stdout
    assert "preflight: all checks passed on 1 host(s), 2 slot(s)" in result.stdout
    command = [line for line in result.stdout.splitlines() if line.startswith("cluster.sh: running:")]
    assert len(command) == 1
    assert " --gloo -np 2 -hostfile " in command[0]
    assert " --start-timeout 45 " in command[0]
    assert f"{sys.prefix}/bin/python -m hvdmri.train --data {phantom_dir}" in command[0]
    assert not (tmp_path / "runs").exists()


def test_more_slots_than_cores_stops_launch(tmp_path, phantom_dir):
    cores = len(os.sched_getaffinity(0))
    hostfile = write_hostfile(tmp_path, f"localhost slots={cores + 1}\n")
    run_dir = tmp_path / "run"
    result = run_script(CLUSTER, [hostfile, "--data", phantom_dir, "--run-dir", run_dir, *FAST],
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = fail_lines(result)
    assert len(failures) == 1, result.stdout
    assert failures[0].startswith(f"FAIL  localhost  cores      hostfile line 1 'localhost slots={cores + 1}': ")
    assert f"slots={cores + 1} but this host has {cores} cores" in failures[0]
    assert "pre-flight failed" in result.stderr
    assert_not_started(result, run_dir)


def test_memory_shortfall_stops_launch(tmp_path, phantom_dir):
    hostfile = write_hostfile(tmp_path, "localhost slots=1\n")
    result = run_script(CLUSTER, ["--worker-memory-gb", "100000", hostfile, "--data", phantom_dir, *FAST],
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = fail_lines(result)
    assert len(failures) == 1, result.stdout
    assert failures[0].startswith("FAIL  localhost  memory     hostfile line 1 'localhost slots=1': ")
    assert_not_started(result, tmp_path / "runs")


# ---------------------------------------------------------------------------------
# Several hosts over ssh (sshd on loopback addresses)
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    require_tools(SSH_BINARIES, "openssh-server")
    with sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_options(server) -> list[str]:
    return ["--network-interface", "lo", "-p", server.port, "-i", server.key, "--start-timeout", START_TIMEOUT]


@pytest.mark.slow
def test_two_hosts_train_over_ssh(ssh_hosts, tmp_path, phantom_dir):
    hostfile = write_hostfile(tmp_path, "# two loopback 'nodes'\n127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    run_dir = tmp_path / "run"
    result = run_script(CLUSTER, [*ssh_options(ssh_hosts), hostfile, "--data", phantom_dir, "--run-dir", run_dir,
                                  "--threads", "1", *FAST], cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    for host in ("127.0.0.2", "127.0.0.3"):
        for check in ("ssh", "python", "hvdmri", "horovod", "cores", "memory", "data", "interface"):
            assert any(line.startswith(f"OK    {host}  {check}") for line in result.stdout.splitlines()), \
                f"no OK verdict for {check} on {host}:\n{result.stdout}"
    assert "preflight: all checks passed on 2 host(s), 2 slot(s)" in result.stdout
    # Rank 0 logs, the other ranks stay quiet: the sshd log below shows where they ran.
    assert rank_lines(result.stdout, 0)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["threads"] == 1
    assert (run_dir / "model.keras").is_file()
    assert (run_dir / "metrics.json").is_file()
    # Both workers were started through sshd, one session per address.
    sshd_log = (Path(ssh_hosts.key).parent / "sshd.log").read_text()
    for host in ("127.0.0.2", "127.0.0.3"):
        assert f"on {host} port {ssh_hosts.port}" in sshd_log


@pytest.mark.slow
def test_unreachable_host_stops_launch(ssh_hosts, tmp_path, phantom_dir):
    # Nothing listens on 127.0.0.9 at the sshd port.
    hostfile = write_hostfile(tmp_path, "127.0.0.2 slots=1\n127.0.0.9 slots=1\n")
    run_dir = tmp_path / "run"
    result = run_script(CLUSTER, [*ssh_options(ssh_hosts), hostfile, "--data", phantom_dir, "--run-dir", run_dir,
                                  *FAST], cwd=tmp_path, timeout=300)
    failures = fail_lines(result)
    assert len(failures) == 1, result.stdout + result.stderr
    assert failures[0].startswith("FAIL  127.0.0.9  ssh        hostfile line 2 '127.0.0.9 slots=1': ssh failed")
    assert "Connection refused" in failures[0]
    assert "OK    127.0.0.2  ssh" in result.stdout
    assert result.returncode == 1
    assert_not_started(result, run_dir)


@pytest.mark.slow
def test_host_without_data_stops_launch(tmp_path):
    require_tools(SSH_BINARIES + ("unshare", "mount"), "openssh-server util-linux")
    from hvdmri.data.synth import write_phantoms

    phantom_dir = write_phantoms(tmp_path / "shared" / "Training", per_class=8, image_size=64)
    # 127.0.0.5's sshd lives in a mount namespace where the data's parent folder is an
    # empty tmpfs: a node that has no copy of the data.
    port = free_port("127.0.0.4")
    with sshd(tmp_path / "sshd-a", addresses=("127.0.0.4",), port=port) as first, \
            sshd(tmp_path / "sshd-b", addresses=("127.0.0.5",), port=port, key=first.key,
                 hidden=[tmp_path / "shared"]):
        hostfile = write_hostfile(tmp_path, "127.0.0.4 slots=1\n127.0.0.5 slots=1\n")
        run_dir = tmp_path / "run"
        result = run_script(CLUSTER, ["--network-interface", "lo", "-p", port, "-i", first.key, hostfile,
                                      "--data", phantom_dir, "--run-dir", run_dir, *FAST], cwd=tmp_path, timeout=300)
    failures = fail_lines(result)
    assert len(failures) == 1, result.stdout + result.stderr
    assert failures[0].startswith("FAIL  127.0.0.5  data       hostfile line 2 '127.0.0.5 slots=1': ")
    assert f"data folder {phantom_dir} not found on this host" in failures[0]
    assert f"OK    127.0.0.4  data       {phantom_dir}: 32 files" in result.stdout
    assert result.returncode == 1
    assert_not_started(result, run_dir)


# ---------------------------------------------------------------------------------
# A worker that dies
# ---------------------------------------------------------------------------------

def descendant_with_rank(root_pid: int, rank: int):
    """Return the training process horovodrun started for rank, below root_pid, or None."""
    import psutil

    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if (process.environ().get("HOROVOD_RANK") == str(rank)
                    and "hvdmri.train" in " ".join(process.cmdline())):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_dead_worker_ends_job(tmp_path, phantom_dir):
    hostfile = write_hostfile(tmp_path, "localhost slots=2\n")
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            ["bash", str(CLUSTER), "--skip-preflight", "--start-timeout", str(START_TIMEOUT), str(hostfile),
             "--data", str(phantom_dir), "--run-dir", str(tmp_path / "run"), *LONG],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            env=launcher_env(), start_new_session=True)
    try:
        # Wait until both ranks train: the first epoch has ended.
        deadline = time.monotonic() + 300
        while "epoch 1/" not in log_path.read_text():
            assert launcher.poll() is None, f"the job ended before training:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no epoch finished within 300 s:\n{log_path.read_text()}"
            time.sleep(0.5)
        victim = descendant_with_rank(launcher.pid, 1)
        assert victim is not None, "rank 1's process not found below the launcher"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        try:
            status = launcher.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {START_TIMEOUT} s after rank 1 died:\n{log_path.read_text()}")
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(30)

    output = log_path.read_text()
    assert status != 0, output
    assert elapsed < START_TIMEOUT
    assert "Process 1 exit with status code" in output
    assert "Process name: 1" in output
    assert "cluster.sh: training failed" in output
    assert "training finished" not in output


# ---------------------------------------------------------------------------------
# SLURM and the smoke script
# ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_slurm_batch_job_trains(tmp_path, phantom_dir):
    require_tools(SLURM_BINARIES, "slurm-wlm munge")
    run_dir = tmp_path / "slurm-run"
    env = launcher_env(HVDMRI_REPO=str(REPO), HVDMRI_RUN_DIR=str(run_dir))
    with slurm_cluster(tmp_path / "slurm", env) as cluster:
        submitted = cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=3G",
            "--time=10", f"--output={tmp_path}/job-%j.log", str(SBATCH), "--data", str(phantom_dir), *FAST,
            cwd=str(tmp_path))
        job_id = submitted.stdout.strip().split(";")[0]
        state = cluster.wait_for_job(job_id, seconds=480)
        log = (tmp_path / f"job-{job_id}.log").read_text()
        assert state.get("JobState") == "COMPLETED", f"{state}\n{log}\n{cluster.log_tail()}"
    assert state.get("ExitCode") == "0:0"

    assert f"slurm.sbatch: job {job_id}: localhost slots=2; run folder {run_dir}" in log
    assert "preflight: all checks passed on 1 host(s), 2 slot(s)" in log
    assert f"run folder: {run_dir}" in log
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["threads"] == 1  # SLURM_CPUS_PER_TASK
    assert (run_dir / "model.keras").is_file()
    logs = run_dir / "logs"
    assert (logs / f"hostfile-{job_id}.txt").read_text().splitlines()[1:] == ["localhost slots=2"]
    assert (logs / "rank.0" / "stdout").is_file()
    assert (logs / "rank.1" / "stdout").is_file()


def test_sbatch_hostfile_from_allocation(tmp_path):
    """slurm.sbatch expands SLURM's node list and task counts into a hostfile.

    The "allocation" is three loopback addresses where nothing listens for ssh, so
    pre-flight must stop the launch after the hostfile is written.
    """
    require_tools(("scontrol",), "slurm-wlm")
    # scontrol reads a configuration even to expand a host list.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hvdmritest\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=test Nodes=localhost\n")
    run_dir = tmp_path / "run"
    result = run_script(SBATCH, ["--weights", "none"], cwd=tmp_path, timeout=300,
                        SLURM_CONF=str(conf), SLURM_JOB_ID="77", SLURM_JOB_NODELIST="127.0.0.[2-4]",
                        SLURM_TASKS_PER_NODE="2(x2),1", SLURM_NTASKS_PER_NODE="", SLURM_CPUS_PER_TASK="1",
                        SLURM_SUBMIT_DIR=str(tmp_path), HVDMRI_REPO=str(REPO), HVDMRI_RUN_DIR=str(run_dir),
                        HVDMRI_SSH_PORT=str(free_port()))
    hostfile = run_dir / "logs" / "hostfile-77.txt"
    assert hostfile.read_text().splitlines()[1:] == ["127.0.0.2 slots=2", "127.0.0.3 slots=2", "127.0.0.4 slots=1"]
    assert "slurm.sbatch: job 77: 127.0.0.2 slots=2,127.0.0.3 slots=2,127.0.0.4 slots=1" in result.stdout
    failures = fail_lines(result)
    assert [line.split()[1:3] for line in failures] == [["127.0.0.2", "ssh"], ["127.0.0.3", "ssh"],
                                                        ["127.0.0.4", "ssh"]], result.stdout + result.stderr
    assert result.returncode == 1
    assert "training not started" in result.stderr
    assert not (run_dir / "config.json").exists()


@pytest.mark.slow
def test_smoke_script_passes(tmp_path):
    result = run_script(SMOKE, [], cwd=tmp_path, timeout=400, TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: passed" in result.stdout
    assert not list(tmp_path.glob("hvdmri-smoke.*")), "smoke.sh left its temporary folder"


@pytest.mark.slow
def test_slurm_stop_checkpoints_and_requeues(tmp_path):
    """scancel --batch --signal=TERM, as SLURM's --signal=B:TERM@120 does before the time limit."""
    require_tools(SLURM_BINARIES + ("scancel",), "slurm-wlm munge")
    from hvdmri.data.synth import write_phantoms

    # 18 steps per epoch on 2 workers at batch 4: the stop lands inside an epoch.
    data = write_phantoms(tmp_path / "Training", per_class=40, image_size=48, seed=1)
    run_dir = tmp_path / "slurm-run"
    env = launcher_env(HVDMRI_REPO=str(REPO), HVDMRI_RUN_DIR=str(run_dir))
    training = ["--data", str(data), "--weights", "none", "--image-size", "32", "--scratch-epochs", "2",
                "--batch-size", "4"]
    with slurm_cluster(tmp_path / "slurm", env) as cluster:
        submitted = cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=3G",
            "--time=20", f"--output={tmp_path}/job-%j.log", str(SBATCH), *training, cwd=str(tmp_path))
        job_id = submitted.stdout.strip().split(";")[0]
        log_path = tmp_path / f"job-{job_id}.log"
        deadline = time.monotonic() + 600
        while not (run_dir / "history.csv").is_file():
            assert cluster.job_state(job_id).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), \
                f"{cluster.job_state(job_id)}\n{log_path.read_text() if log_path.exists() else ''}"
            assert time.monotonic() < deadline, "no epoch finished within 600 s"
            time.sleep(1)
        cluster.run("scancel", "--batch", "--signal=TERM", job_id)

        # The job stops, requeues itself and runs again to the end.
        deadline = time.monotonic() + 900
        state: dict = {}
        while time.monotonic() < deadline:
            state = cluster.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            time.sleep(2)
        log = log_path.read_text()
        assert state.get("JobState") == "COMPLETED", f"{state}\n{log}\n{cluster.log_tail()}"
    assert int(state.get("Restarts", "0")) == 1, state
    assert "slurm.sbatch: stop requested" in log
    assert "stopped by the STOP file in epoch" in log
    assert f"slurm.sbatch: training stopped with a checkpoint; requeueing job {job_id}" in log
    assert "continuing epoch" in log or "resuming" in log, log
    assert f"run folder: {run_dir}" in log
    history = (run_dir / "history.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in history] == ["1", "2"]
    assert not (run_dir / "STOP").exists()
