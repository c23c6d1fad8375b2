"""Real servers for the cluster tests: sshd on loopback addresses and a one-node SLURM cluster.

Everything listens on loopback only: sshd binds 127.0.0.2 and 127.0.0.3, and the
SLURM daemons run inside a network namespace of their own whose only interface is lo.
Each helper stops what it started. Both need root (sshd logs in as root; network
namespaces and SLURM's daemons need root), and the tests skip without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

SSH_ADDRESSES = ("127.0.0.2", "127.0.0.3")
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "ip", "nsenter")
SSH_BINARIES = ("sshd", "ssh", "ssh-keygen")


def require_tools(binaries: tuple[str, ...], packages: str) -> None:
    """Skip (or fail under CI=true, where .ci/run installs them) when a tool is missing."""
    missing = [name for name in binaries if not shutil.which(name) and not Path("/usr/sbin", name).exists()]
    if os.geteuid() != 0:
        pytest.skip("needs root: starts sshd or SLURM daemons and logs in as root")
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install {packages})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run should have installed them")
        pytest.skip(message)


def tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def wait_for_port(address: str, port: int, process: subprocess.Popen, log: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {address}:{port} after {seconds} s; log: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen, seconds: float = 15) -> None:
    """Stop a server started in its own session: SIGTERM to its group, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(seconds)


# ---------------------------------------------------------------------------------
# sshd
# ---------------------------------------------------------------------------------

@dataclass
class SshServer:
    """An sshd with a test-generated host key, accepting one test-generated user key."""

    port: int
    key: Path
    addresses: tuple[str, ...]


@contextlib.contextmanager
def known_hosts_restored(addresses: tuple[str, ...], port: int) -> Iterator[None]:
    """Remove the host keys ssh records for these test servers, leaving other entries alone."""
    known_hosts = Path.home() / ".ssh" / "known_hosts"
    backup = known_hosts.with_name("known_hosts.old")
    existed = known_hosts.exists()
    backup_before = backup.read_bytes() if backup.exists() else None
    try:
        yield
    finally:
        if known_hosts.exists():
            for address in addresses:
                subprocess.run(["ssh-keygen", "-R", f"[{address}]:{port}", "-f", str(known_hosts)],
                               capture_output=True, check=False)
            # ssh-keygen -R leaves a backup; put back whatever was there before.
            if backup_before is None:
                backup.unlink(missing_ok=True)
            else:
                backup.write_bytes(backup_before)
            if not existed and not known_hosts.read_text().strip():
                known_hosts.unlink()


@contextlib.contextmanager
def sshd(folder: Path, addresses: tuple[str, ...] = SSH_ADDRESSES, hidden: list[Path] | None = None,
         port: int | None = None, key: Path | None = None) -> Iterator[SshServer]:
    """Start sshd on addresses (loopback) with key login for root; stop it afterwards.

    hidden: folders covered by an empty tmpfs in sshd's own mount namespace, so
    sessions on this "host" do not see their contents, as on a node without a copy.
    key: reuse this private key (one client key for several servers).
    """
    folder.mkdir(parents=True, exist_ok=True)
    host_key = folder / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    if key is None:
        key = folder / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key), "-C", "hvdmri-test"],
                       check=True)
    (folder / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    port = port or free_port(addresses[0])
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        *(f"ListenAddress {address}" for address in addresses),
        f"HostKey {host_key}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        # pytest's temporary folders are not root-only all the way up.
        "StrictModes no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "",
    ]))
    # sshd refuses to start without its privilege separation folder.
    privsep = Path("/run/sshd")
    created_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)

    log = folder / "sshd.log"
    command = [tool("sshd"), "-D", "-e", "-f", str(config)]
    if hidden:
        mounts = " && ".join(f"mount -t tmpfs hvdmri-test-empty {_quote(path)}" for path in hidden)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"{mounts} && exec {' '.join(_quote(part) for part in command)}"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with known_hosts_restored(addresses, port):
            for address in addresses:
                wait_for_port(address, port, process, log)
            yield SshServer(port, key, addresses)
    finally:
        stop(process)
        if created_privsep:
            with contextlib.suppress(OSError):
                privsep.rmdir()


def _quote(value: object) -> str:
    import shlex

    return shlex.quote(str(value))


# ---------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------

@dataclass
class SlurmCluster:
    """A one-node SLURM cluster; run() executes a client command inside its namespace."""

    folder: Path
    namespace: str
    env: dict

    def run(self, *command: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        argv = [*enter_namespace(self.namespace), *command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def job_state(self, job_id: str) -> dict:
        """Return the fields of `scontrol show job` as a dict (JobState, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id: str, seconds: float) -> dict:
        """Wait until the job leaves the queue; return its final fields. Raises TimeoutError."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            fields = self.job_state(job_id)
            if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return fields
            time.sleep(2)
        raise TimeoutError(f"SLURM job {job_id} still {self.job_state(job_id).get('JobState')} after {seconds} s")

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)


@contextlib.contextmanager
def slurm_cluster(folder: Path, env: dict, cpus: int = 2, memory_mb: int = 4096) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd for one node called localhost; stop them afterwards.

    The SLURM daemons run in a new network namespace with only lo up, so they listen
    on loopback whatever their bind defaults are, and the standard ports cannot clash
    with anything on the machine. munged talks over a Unix socket in folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    namespace = f"hvdmri-test-{os.getpid()}-{time.monotonic_ns() % 100000}"
    processes: list[subprocess.Popen] = []
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        # glibc's getaddrinfo(AI_ADDRCONFIG), which SLURM uses, finds no IPv4 at all while
        # 127.0.0.1 is the only address; a second loopback address fixes that.
        subprocess.run(["ip", "-n", namespace, "addr", "add", "127.0.0.10/8", "dev", "lo"], check=True)

        key = folder / "munge.key"
        subprocess.run([tool("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        socket_path = folder / "munge.socket"
        munged_log = folder / "munged.log"
        processes.append(_start([tool("munged"), "--foreground", "--force", f"--key-file={key}",
                                 f"--socket={socket_path}", f"--pid-file={folder / 'munged.pid'}",
                                 f"--log-file={munged_log}", f"--seed-file={folder / 'munged.seed'}"],
                                munged_log.with_suffix(".out")))
        _wait_for_path(socket_path, processes[-1], munged_log)

        conf = folder / "slurm.conf"
        conf.write_text(slurm_conf(folder, socket_path, cpus, memory_mb))
        for name in ("state", "spool"):
            (folder / name).mkdir(exist_ok=True)
        slurm_env = {**env, "SLURM_CONF": str(conf)}
        in_namespace = enter_namespace(namespace)
        processes.append(_start([*in_namespace, tool("slurmctld"), "-D", "-i"], folder / "slurmctld.out",
                                slurm_env))
        processes.append(_start([*in_namespace, tool("slurmd"), "-D", "-N", "localhost"], folder / "slurmd.out",
                                slurm_env))
        cluster = SlurmCluster(folder, namespace, slurm_env)
        _wait_for_idle_node(cluster, processes)
        yield cluster
    finally:
        for process in reversed(processes):
            stop(process)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def enter_namespace(namespace: str) -> list[str]:
    """Return the command prefix that runs a program in the namespace.

    nsenter switches only the network namespace; `ip netns exec` would also remount
    /sys without the cgroup mounts that slurmd needs.
    """
    return ["nsenter", f"--net=/run/netns/{namespace}"]


def slurm_conf(folder: Path, munge_socket: Path, cpus: int, memory_mb: int) -> str:
    return f"""\
ClusterName=hvdmritest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=30 State=UP
"""


def _start(command: list[str], output: Path, env: dict | None = None) -> subprocess.Popen:
    with open(output, "wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_path(path: Path, process: subprocess.Popen, log: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    text = log.read_text() if log.exists() else ""
    raise RuntimeError(f"munged did not create {path} (status {process.poll()}): {text[-2000:]}")


def _wait_for_idle_node(cluster: SlurmCluster, processes: list[subprocess.Popen], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    state = ""
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a SLURM daemon exited with status {process.returncode}:\n{cluster.log_tail()}")
        result = cluster.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False, timeout=20)
        state = result.stdout.strip()
        if state == "idle":
            return
        time.sleep(1)
    raise TimeoutError(f"node localhost is '{state}', not idle, after {seconds} s:\n{cluster.log_tail()}")
