"""Pre-flight checks for a multi-node launch: one verdict line per host and check.

    python -m hvdmri.preflight hostfiles/lab-4x8gb.txt --data /srv/mri/Training --batch-size 16
    python -m hvdmri.preflight -p 2222 -i ~/.ssh/lab_key --network-interface eth0 HOSTFILE --data DIR

Options before HOSTFILE configure the checks; everything after it is the training
command line, parsed exactly as `python -m hvdmri.train` parses it. launch/cluster.sh
runs these checks before it starts horovodrun.

Every host gets one probe: this file itself, fed on stdin to the host's Python, over
ssh or directly on this machine. So the module imports only the standard library at
the top, and a host without hvdmri or Horovod still gets a report.

Exit status: 0 when no check failed (warnings allowed), 1 when a check failed,
2 for an invalid hostfile or invalid flags.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

GIB = 1024 ** 3

# horovodrun 0.28.1 reads each hostfile line as "HOST slots=N" and nothing else: a
# comment or a blank line makes it crash, so launch/cluster.sh hands it a copy that
# print_hostfile() wrote. Host names must match its pattern [\w.-]+.
HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
HOST_NAME = re.compile(r"^[\w.-]+$")

# Rank 0 keeps --keep-checkpoints epoch files (default 2) and possibly an older best
# epoch. It writes the next one to a temporary file first. That makes (2 + 2)
# checkpoints of 0.27 GiB (weights with Adam state), plus model.keras (0.09 GiB).
# TODO: take --keep-checkpoints from the training flags instead of assuming the default.
CHECKPOINT_DISK_GIB = 1.2

PROBE_MARKER = "HVDMRI-PREFLIGHT-PROBE "
# Seconds a probe may take once ssh is connected: importing TensorFlow dominates.
PROBE_SECONDS = 180


@dataclass(frozen=True)
class HostEntry:
    """One hostfile line: the host, its slots, and where it was written."""

    host: str
    slots: int
    line_number: int
    text: str

    def where(self) -> str:
        return f"hostfile line {self.line_number} '{self.text}'"


@dataclass(frozen=True)
class HostfileProblem:
    """One invalid hostfile line (line 0 for the file as a whole)."""

    line_number: int
    text: str
    reason: str

    @property
    def host(self) -> str:
        return self.text.split()[0] if self.text else "-"

    def describe(self, path: str) -> str:
        where = f"{path} line {self.line_number} '{self.text}'" if self.line_number else path
        return f"FAIL  {self.host}  hostfile  {where}: {self.reason}"


class HostfileError(Exception):
    """The hostfile cannot be used; carries every problem found, not only the first."""

    def __init__(self, path: str, problems: list[HostfileProblem]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)")


def parse_hostfile(path: str | os.PathLike) -> list[HostEntry]:
    """Parse a horovodrun hostfile ("HOST slots=N" per line, '#' comments allowed).

    Raises:
        HostfileError: the file is missing, empty, or has a syntax error, a slot count
            that is not a positive integer, an invalid host name or a duplicate host.
    """
    path = str(path)
    try:
        raw_lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise HostfileError(path, [HostfileProblem(0, "", f"cannot read the hostfile: {error.strerror or error}")])

    entries: list[HostEntry] = []
    problems: list[HostfileProblem] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        match = HOSTFILE_LINE.match(text)
        if not match:
            problems.append(HostfileProblem(number, text, "expected 'HOST slots=N' (for example 'node1 slots=1')"))
            continue
        host, slots_text = match["host"], match["slots"]
        if not HOST_NAME.match(host):
            problems.append(HostfileProblem(
                number, text, f"host name '{host}' is invalid: horovodrun accepts letters, digits, '_', '.' and '-'"))
            continue
        if not slots_text.isdigit() or int(slots_text) == 0:
            problems.append(HostfileProblem(number, text, f"slots must be a positive integer, got '{slots_text}'"))
            continue
        if host in first_line_of:
            problems.append(HostfileProblem(
                number, text, f"duplicate host '{host}': already listed on line {first_line_of[host]}"))
            continue
        first_line_of[host] = number
        entries.append(HostEntry(host, int(slots_text), number, text))

    if not entries and not problems:
        problems.append(HostfileProblem(0, "", "no hosts listed (the file has only comments or blank lines)"))
    if problems:
        raise HostfileError(path, problems)
    return entries


def print_hostfile(entries: list[HostEntry]) -> None:
    """Print the entries in the bare format horovodrun 0.28.1 reads."""
    for entry in entries:
        print(f"{entry.host} slots={entry.slots}")


def estimate_worker_memory_gib(batch_size: int, image_size: int, precision: str = "auto") -> float:
    """Return the estimated peak RSS of one training worker in GiB, from the measured model.

    Imported here, not at the top: the probe part of this file runs on hosts that may lack hvdmri.
    """
    from hvdmri.memory import estimate_worker_memory_gib as estimate

    return estimate(batch_size, image_size, precision)


# ---------------------------------------------------------------------------------
# The probe: runs on each host. Standard library only at import time.
# ---------------------------------------------------------------------------------

def probe(request: dict) -> dict:
    """Collect the facts about this host that the checks compare."""
    facts: dict = {
        "hostname": socket.gethostname(),
        "machine_id": _read_machine_id(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory": _read_meminfo(),
        "interfaces": _list_interfaces(),
        "workdir_exists": os.path.isdir(request["workdir"]),
    }
    if request.get("data"):
        facts["data"] = _count_files(request["data"])
    if request.get("disk_path"):
        facts["disk_free"] = _free_bytes(request["disk_path"])
    facts["software"] = _software_versions()
    return facts


def _read_machine_id() -> str | None:
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(candidate).read_text().strip() or None
        except OSError:
            continue
    return None


def _read_meminfo() -> dict:
    """Return MemTotal and MemAvailable in bytes (empty on systems without /proc/meminfo)."""
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _list_interfaces() -> dict[str, list[str]]:
    """Return {interface name: IPv4 addresses}; addresses stay empty without psutil."""
    try:
        import psutil  # a Horovod dependency, present in the hvdmri environment
    except ImportError:
        return {name: [] for _, name in socket.if_nameindex()}
    return {name: [a.address for a in addresses if a.family == socket.AF_INET]
            for name, addresses in psutil.net_if_addrs().items()}


def _count_files(folder: str) -> dict:
    """Count the regular, non-hidden files under folder, the way the image listing skips hidden ones."""
    if not os.path.isdir(folder):
        return {"exists": False}
    count = 0
    for _, directories, files in os.walk(folder):
        directories[:] = [d for d in directories if not d.startswith(".")]
        count += sum(1 for name in files if not name.startswith("."))
    return {"exists": True, "files": count}


def _free_bytes(path: str) -> dict:
    """Return free bytes on the file system that contains path, or its nearest existing parent."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return {"path": str(existing), "free": shutil.disk_usage(existing).free}
    except OSError as error:
        return {"path": str(existing), "error": str(error)}


def _software_versions() -> dict:
    """Import hvdmri, TensorFlow and Horovod; record versions, build flags and import errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    found: dict = {}
    try:
        import hvdmri

        found["hvdmri"] = hvdmri.__version__
        found["hvdmri_commit"] = _git_commit(Path(hvdmri.__file__).resolve().parent)
    except ImportError as error:
        found["hvdmri_error"] = str(error)
    # Any failure here is a finding about the host, so it is recorded, not raised:
    # a broken TensorFlow or Horovod build raises more than ImportError.
    try:
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    except Exception as error:  # noqa: BLE001
        found["tensorflow_error"] = f"{type(error).__name__}: {error}"
    try:
        import horovod

        found["horovod"] = horovod.__version__
        import horovod.tensorflow as hvd

        found["horovod_tensorflow"] = True
        found["horovod_gloo"] = bool(hvd.gloo_built())
    except Exception as error:  # noqa: BLE001
        found["horovod_error"] = f"{type(error).__name__}: {error}"
    return found


def _git_commit(folder: Path) -> str | None:
    """Return the commit of the git checkout that contains folder, or None outside one."""
    try:
        result = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_probe_cli(request_json: str) -> int:
    print(PROBE_MARKER + json.dumps(probe(json.loads(request_json))), flush=True)
    return EXIT_OK


# ---------------------------------------------------------------------------------
# The launch side: run the probes, compare the facts, print the verdicts.
# ---------------------------------------------------------------------------------

@dataclass
class Settings:
    """Command-line values the checks use."""

    python: str
    ssh_port: int | None
    ssh_identity_file: str | None
    ssh_timeout: int
    interfaces: list[str]
    data: str | None
    run_dir: str
    workdir: str
    batch_size: int
    image_size: int
    threads: int | None
    worker_memory_gib: float


@dataclass
class HostReport:
    """The probe outcome for one host and the verdict lines it produced."""

    entry: HostEntry
    local: bool
    address: str | None = None
    facts: dict | None = None
    verdicts: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, check: str, detail: str) -> None:
        if status == "FAIL":
            detail = f"{self.entry.where()}: {detail}"
        self.verdicts.append((status, check, detail))

    @property
    def failed(self) -> int:
        return sum(1 for status, _, _ in self.verdicts if status == "FAIL")


def local_addresses() -> set[str]:
    """Return this machine's IPv4 addresses; horovodrun starts workers there without ssh."""
    addresses = {"127.0.0.1"}
    for values in _list_interfaces().values():
        addresses.update(values)
    return addresses


def resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def ssh_command(settings: Settings, host: str, remote: str) -> list[str]:
    """Build the ssh call: key login only (BatchMode), never a password prompt."""
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={settings.ssh_timeout}",
               "-o", "StrictHostKeyChecking=accept-new"]
    if settings.ssh_port:
        command += ["-p", str(settings.ssh_port)]
    if settings.ssh_identity_file:
        command += ["-i", settings.ssh_identity_file]
    return command + [host, remote]


def run_probe(report: HostReport, settings: Settings, request: dict) -> None:
    """Run the probe on report's host and fill report.facts, or add the FAIL verdict."""
    probe_args = [settings.python, "-", "--probe", json.dumps(request)]
    if report.local:
        command = probe_args
    else:
        command = ssh_command(settings, report.entry.host, shlex.join(probe_args))
    try:
        result = subprocess.run(command, input=Path(__file__).read_text(), capture_output=True, text=True,
                                timeout=settings.ssh_timeout + PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        report.add("FAIL", "ssh", f"no answer within {settings.ssh_timeout + PROBE_SECONDS} s "
                                  f"(ssh or the host's Python hangs)")
        return
    except FileNotFoundError as error:
        check = "python" if report.local else "ssh"
        report.add("FAIL", check, f"cannot run {error.filename}: not found on this machine")
        return

    last_error = _last_line(result.stderr)
    if not report.local and result.returncode == 255:
        report.add("FAIL", "ssh", f"ssh failed (BatchMode, so key login only): {last_error}; set up key "
                                  f"login for this host, or pass -p PORT / -i KEY")
        return
    if report.local:
        report.add("OK", "ssh", "this machine: horovodrun starts its workers without ssh")
    else:
        port = f"port {settings.ssh_port}" if settings.ssh_port else "default port"
        report.add("OK", "ssh", f"key login without a password works ({port}, BatchMode)")
    if result.returncode == 127:
        report.add("FAIL", "python", f"{settings.python} not found on this host; horovodrun starts "
                                     f"workers with this path on every host, so run launch/setup.sh there")
        return
    lines = [line for line in result.stdout.splitlines() if line.startswith(PROBE_MARKER)]
    if result.returncode != 0 or not lines:
        report.add("FAIL", "python", f"the probe failed with exit status {result.returncode}: {last_error}")
        return
    report.facts = json.loads(lines[-1][len(PROBE_MARKER):])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def check_software(report: HostReport, reference: dict) -> None:
    """Compare Python, hvdmri, TensorFlow and Horovod with the launch node's."""
    facts, software, expected = report.facts, report.facts["software"], reference["software"]
    if facts["python"] == reference["python"]:
        report.add("OK", "python", f"Python {facts['python']} at {facts['executable']}")
    else:
        report.add("FAIL", "python", f"Python {facts['python']} here but {reference['python']} on the "
                                     f"launch node; install the same version on every host")

    if "hvdmri_error" in software:
        report.add("FAIL", "hvdmri", f"cannot import hvdmri: {software['hvdmri_error']}; run launch/setup.sh here")
    elif software["hvdmri"] != expected.get("hvdmri"):
        report.add("FAIL", "hvdmri", f"hvdmri {software['hvdmri']} here but {expected.get('hvdmri')} on the "
                                     f"launch node; check out the same version on every host")
    elif software.get("hvdmri_commit") != expected.get("hvdmri_commit"):
        report.add("WARN", "hvdmri", f"hvdmri {software['hvdmri']} at commit {software.get('hvdmri_commit')} "
                                     f"here but {expected.get('hvdmri_commit')} on the launch node")
    else:
        commit = software.get("hvdmri_commit")
        report.add("OK", "hvdmri", f"hvdmri {software['hvdmri']}" + (f" (commit {commit[:12]})" if commit else ""))

    problems = []
    if "tensorflow_error" in software:
        problems.append(f"cannot import TensorFlow: {software['tensorflow_error']}")
    elif software["tensorflow"] != expected.get("tensorflow"):
        problems.append(f"TensorFlow {software['tensorflow']} here but {expected.get('tensorflow')} on the launch node")
    if "horovod_error" in software:
        problems.append(f"Horovod without TensorFlow support: {software['horovod_error']}")
    else:
        if software["horovod"] != expected.get("horovod"):
            problems.append(f"Horovod {software['horovod']} here but {expected.get('horovod')} on the launch node")
        if not software["horovod_gloo"]:
            problems.append("Horovod was built without Gloo")
    if problems:
        report.add("FAIL", "horovod", "; ".join(problems) + "; rebuild with launch/setup.sh --force")
    else:
        report.add("OK", "horovod", f"Horovod {software['horovod']} with TensorFlow "
                                    f"{software['tensorflow']} and Gloo")


def check_cores(report: HostReport, settings: Settings) -> None:
    cores, slots = report.facts["cores"], report.entry.slots
    if slots > cores:
        report.add("FAIL", "cores", f"slots={slots} but this host has {cores} cores; use at most "
                                    f"slots={cores} (one worker per core at least)")
        return
    threads = settings.threads or max(1, cores // slots)
    if slots * threads > cores:
        report.add("WARN", "cores", f"{slots} workers x --threads {threads} = {slots * threads} threads "
                                    f"on {cores} cores: oversubscribed, so steps slow down")
    else:
        report.add("OK", "cores", f"{slots} worker(s) x {threads} threads on {cores} cores")


def check_memory(report: HostReport, settings: Settings) -> None:
    available = report.facts["memory"].get("MemAvailable")
    if available is None:
        report.add("WARN", "memory", "cannot read MemAvailable from /proc/meminfo; memory not checked")
        return
    needed_gib = report.entry.slots * settings.worker_memory_gib
    available_gib = available / GIB
    summary = (f"{report.entry.slots} worker(s) x {settings.worker_memory_gib:.1f} GiB (estimate for batch "
               f"{settings.batch_size} at {settings.image_size} px) = {needed_gib:.1f} GiB, "
               f"{available_gib:.1f} GiB available")
    if needed_gib > available_gib:
        report.add("FAIL", "memory", f"{summary}; lower --batch-size, --image-size or slots "
                                     f"(or set --worker-memory-gb from a measurement)")
    else:
        report.add("OK", "memory", summary)


def check_data(report: HostReport, settings: Settings, rank0: HostReport) -> None:
    if not settings.data:
        report.add("OK", "data", "no --data: each host generates the synthetic phantom set on first use")
        return
    data = report.facts["data"]
    if not data["exists"]:
        report.add("FAIL", "data", f"data folder {settings.data} not found on this host; every host "
                                   f"needs it at the same path (copy it or use a shared folder)")
        return
    expected = rank0.facts["data"] if rank0.facts else None
    if report is not rank0 and expected and expected["exists"] and expected["files"] != data["files"]:
        report.add("FAIL", "data", f"{settings.data} has {data['files']} files here but {expected['files']} "
                                   f"on {rank0.entry.host} (rank 0); sync the copies")
        return
    report.add("OK", "data", f"{settings.data}: {data['files']} files")


def check_workdir(report: HostReport, settings: Settings) -> None:
    if not report.local and any(character.isspace() for character in settings.workdir):
        # horovodrun 0.28.1 runs "cd <launch folder>" unquoted on remote hosts, so the cd
        # fails silently and the worker starts in the home folder.
        report.add("FAIL", "workdir", f"the launch folder '{settings.workdir}' contains whitespace, which "
                                      f"horovodrun cannot pass to remote hosts; launch from another folder")
    elif report.facts["workdir_exists"]:
        report.add("OK", "workdir", f"{settings.workdir} exists")
    else:
        report.add("FAIL", "workdir", f"{settings.workdir} not found on this host; horovodrun starts every "
                                      f"worker in the launch folder, so launch from a folder every host has")


def check_disk(report: HostReport) -> None:
    disk = report.facts["disk_free"]
    if "error" in disk:
        report.add("FAIL", "disk", f"cannot read free space at {disk['path']}: {disk['error']}")
        return
    free_gib = disk["free"] / GIB
    summary = (f"{free_gib:.1f} GiB free at {disk['path']} for the run folder; checkpoints need about "
               f"{CHECKPOINT_DISK_GIB} GiB (estimate)")
    if free_gib < CHECKPOINT_DISK_GIB:
        report.add("FAIL", "disk", f"{summary}; free space or choose another --run-dir")
    else:
        report.add("OK", "disk", summary)


def check_interfaces(reports: list[HostReport], settings: Settings) -> None:
    """Check that every host has the interfaces Horovod will use; name the hosts that lack one."""
    probed = [report for report in reports if report.facts]
    distinct_machines = len({report.facts["machine_id"] or report.entry.host for report in probed}) > 1
    # A host whose probe failed has its own FAIL line, and the OK lines name it as left out.
    unprobed = [report.entry.host for report in reports if not report.facts]
    caveat = f"; not checked on {', '.join(unprobed)}, whose probe failed" if unprobed else ""
    if settings.interfaces:
        for report in probed:
            present = report.facts["interfaces"]
            missing = [name for name in settings.interfaces if name not in present]
            if missing:
                report.add("FAIL", "interface", f"interface {', '.join(missing)} not found on this host "
                                                f"(it has {', '.join(sorted(present))})")
            elif "lo" in settings.interfaces and distinct_machines:
                report.add("FAIL", "interface", "--network-interface lo cannot connect different machines; "
                                                "name an interface with a routed address")
            else:
                report.add("OK", "interface", f"has {', '.join(settings.interfaces)}{caveat}")
        return

    if not all(report.local for report in reports):
        routed = {report.entry.host: {name for name, addresses in report.facts["interfaces"].items()
                                      if addresses and name != "lo"} for report in probed}
        common = set.intersection(*routed.values()) if routed else set()
        for report in probed:
            if common:
                report.add("OK", "interface", f"shares {', '.join(sorted(common))} with every host; horovodrun "
                                              f"picks among them unless --network-interface is given{caveat}")
                continue
            others = {name: [host for host, names in routed.items() if name in names]
                      for name in set().union(*routed.values()) if name not in routed[report.entry.host]}
            lacking = "; ".join(f"{name} (on {', '.join(hosts)})" for name, hosts in sorted(others.items()))
            report.add("FAIL", "interface", f"no interface with an IPv4 address is on every host: this host "
                                            f"lacks {lacking or 'every interface the others have'}; pass "
                                            f"--network-interface NAME for one that all hosts have")
    else:
        for report in probed:
            report.add("OK", "interface", "all workers on this machine: loopback")


def check_addresses(reports: list[HostReport]) -> None:
    """Resolve every host; two lines naming one address would double-book that machine."""
    owner_of: dict[str, HostReport] = {}
    mine = local_addresses()
    for report in reports:
        report.address = resolve(report.entry.host)
        if report.address is None:
            report.add("FAIL", "ssh", f"host name '{report.entry.host}' does not resolve; fix the name "
                                      f"or add it to DNS or /etc/hosts")
            continue
        report.local = report.address in mine
        if report.address in owner_of:
            first = owner_of[report.address]
            report.add("FAIL", "hostfile", f"resolves to {report.address}, the same machine as "
                                           f"'{first.entry.host}' on line {first.entry.line_number}; "
                                           f"list each machine once with all its slots")
            continue
        owner_of[report.address] = report


def run_checks(entries: list[HostEntry], settings: Settings) -> list[HostReport]:
    """Probe every host in parallel and compare the results; return one report per host."""
    reports = [HostReport(entry, local=False) for entry in entries]
    check_addresses(reports)
    reachable = [report for report in reports if report.failed == 0]

    rank0 = reports[0]
    run_dir = str(Path(settings.workdir, settings.run_dir))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(reachable) or 1)) as pool:
        jobs = [pool.submit(run_probe, report, settings,
                            {"workdir": settings.workdir, "data": settings.data,
                             "disk_path": run_dir if report is rank0 else None})
                for report in reachable]
        for job in jobs:
            job.result()
    reference = launch_node_facts(reachable, settings)

    for report in reachable:
        if not report.facts:
            continue
        check_software(report, reference)
        check_cores(report, settings)
        check_memory(report, settings)
        check_data(report, settings, rank0)
        check_workdir(report, settings)
        if report is rank0:
            check_disk(report)
    check_interfaces(reachable, settings)
    return reports


def launch_node_facts(reports: list[HostReport], settings: Settings) -> dict:
    """Return the facts of the launch node, the reference for versions, whether or not it trains."""
    for report in reports:
        if report.local and report.facts:
            return report.facts
    command = [settings.python, "-", "--probe", json.dumps({"workdir": settings.workdir})]
    result = subprocess.run(command, input=Path(__file__).read_text(), capture_output=True, text=True,
                            timeout=PROBE_SECONDS)
    lines = [line for line in result.stdout.splitlines() if line.startswith(PROBE_MARKER)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the probe failed on the launch node: {_last_line(result.stderr)}")
    return json.loads(lines[-1][len(PROBE_MARKER):])


def print_verdicts(reports: list[HostReport]) -> None:
    width = max(len(report.entry.host) for report in reports)
    for report in reports:
        for status, check, detail in report.verdicts:
            print(f"{status:<4}  {report.entry.host:<{width}}  {check:<9}  {detail}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvdmri.preflight",
        description="Check every host of a hostfile before a Horovod training launch: ssh, versions, "
                    "cores, memory, data, disk and network interfaces. Prints one verdict line per "
                    "host and check; exits 1 when a check fails, 2 on an invalid hostfile or flags.",
        epilog="Everything after HOSTFILE is the training command line (python -m hvdmri.train flags).",
    )
    parser.add_argument("--network-interface", action="append", default=[], metavar="NAME",
                        help="interface horovodrun will use (repeatable); checked on every host")
    parser.add_argument("-p", "--ssh-port", type=int, help="ssh port of every host (default: ssh's own)")
    parser.add_argument("-i", "--ssh-identity-file", metavar="KEY", help="private key for ssh")
    parser.add_argument("--ssh-timeout", type=int, default=10, metavar="SECONDS",
                        help="ssh connect timeout per host (default 10)")
    parser.add_argument("--python", default=sys.executable,
                        help="Python that runs the workers, the same path on every host "
                             "(default: this Python)")
    parser.add_argument("--worker-memory-gb", type=float, metavar="GIB",
                        help="memory one worker needs, in GiB, replacing the built-in estimate")
    parser.add_argument("--print-hostfile", action="store_true",
                        help="only validate HOSTFILE and print it without comments, as horovodrun reads it")
    parser.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("hostfile", nargs="?", help="hostfile with one 'HOST slots=N' line per host")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe is not None:
        return run_probe_cli(args.probe)
    if not args.hostfile:
        parser.error("HOSTFILE is required")

    try:
        entries = parse_hostfile(args.hostfile)
    except HostfileError as error:
        for problem in error.problems:
            print(problem.describe(error.path), file=sys.stderr)
        print(f"preflight: invalid hostfile {error.path}; not starting training", file=sys.stderr)
        return EXIT_USAGE
    if args.print_hostfile:
        print_hostfile(entries)
        return EXIT_OK

    from hvdmri.config import parse_args

    config = parse_args(args.train_args)  # exits 2 with a one-line error on invalid training flags
    workdir = os.getcwd()
    settings = Settings(
        python=args.python, ssh_port=args.ssh_port, ssh_identity_file=args.ssh_identity_file,
        ssh_timeout=args.ssh_timeout, interfaces=args.network_interface,
        data=str(Path(workdir, config.data)) if config.data else None,
        run_dir=config.run_dir or "runs", workdir=workdir, batch_size=config.batch_size,
        image_size=config.image_size, threads=config.threads,
        worker_memory_gib=args.worker_memory_gb or estimate_worker_memory_gib(config.batch_size, config.image_size,
                                                                              config.precision),
    )
    slots = sum(entry.slots for entry in entries)
    print(f"preflight: {len(entries)} host(s), {slots} slot(s) from {args.hostfile}", flush=True)

    try:
        reports = run_checks(entries, settings)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"preflight: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print_verdicts(reports)

    failed_hosts = [report for report in reports if report.failed]
    if failed_hosts:
        total = sum(report.failed for report in failed_hosts)
        names = ", ".join(report.entry.host for report in failed_hosts)
        print(f"preflight: {total} check(s) failed on {names}; not starting training", file=sys.stderr)
        return EXIT_FAILED
    print(f"preflight: all checks passed on {len(entries)} host(s), {slots} slot(s)", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
