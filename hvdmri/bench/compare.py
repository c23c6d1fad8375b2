"""Run configurations as child processes, in rounds, and compare them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hvdmri.bench.options import BenchConfig, worker_argv

# A 224 px step at batch 64 takes tens of seconds on 2 cores; this only stops a hung run.
RUN_TIMEOUT_S = 3600


def combine(config: BenchConfig, workers: list[dict]) -> dict:
    """Build the run's JSON line from every worker's measurements (sorted by rank)."""
    workers = sorted(workers, key=lambda record: record["rank"])
    chief = workers[0]
    return {
        **config.to_dict(),
        "precision_used": chief["precision"],
        "world_size": chief["world_size"],
        "images_per_s": round(sum(record["images_per_s"] for record in workers), 3),
        "images_per_s_per_worker": [round(record["images_per_s"], 3) for record in workers],
        "step_s": round(max(record["step_s"] for record in workers), 4),
        "step_s_per_worker": [[round(record[key], 4) for key in ("step_s", "step_s_min", "step_s_max")]
                              for record in workers],
        "warmup_s": chief["warmup_s"],
        "breakdown_s_per_worker": [record.get("breakdown_s") for record in workers],
        "peak_rss_gib_per_worker": [record["peak_rss_gib"] for record in workers],
        "load_average_start": chief["load_average_start"],
        "load_average_end": chief["load_average_end"],
        "horovod_cycle_time_ms": chief.get("horovod_cycle_time_ms"),
        **{key: chief[key] for key in ("host", "cores", "cpu_bf16", "tensorflow", "horovod")},
    }


def child_env(**extra: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    # Children import hvdmri from the checkout this process runs from.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def horovodrun_path() -> str:
    beside = Path(sys.executable).with_name("horovodrun")
    found = str(beside) if beside.exists() else shutil.which("horovodrun")
    if not found:
        raise RuntimeError("horovodrun not found next to this Python or on PATH; run launch/setup.sh")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_config(config: BenchConfig, folder: Path) -> dict:
    """Run one configuration in fresh processes and return its JSON line.

    Raises:
        RuntimeError: a worker failed; the message has the end of its output.
    """
    result = folder / f"{config.name}.json"
    bench = [sys.executable, "-m", "hvdmri.bench", "--worker", "--result", str(result), *worker_argv(config)]
    if config.mode == "mwms":
        return _run_mwms(config, bench, result)
    if config.np > 1:
        # --network-interface lo keeps Gloo on loopback, also inside a network namespace.
        bench = [horovodrun_path(), "--gloo", "-np", str(config.np), "-H", f"localhost:{config.np}",
                 "--network-interface", "lo", "--start-timeout", "120", *bench]
    run = subprocess.run(bench, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=child_env())
    if run.returncode != 0 or not result.exists():
        raise RuntimeError(f"configuration {config.name} failed with exit status {run.returncode}: "
                           f"{(run.stdout + run.stderr)[-3000:]}")
    # The child does not know the configuration's name.
    return {**json.loads(result.read_text()), "name": config.name}


def _run_mwms(config: BenchConfig, bench: list[str], result: Path) -> dict:
    """Start np processes with a TF_CONFIG on 127.0.0.1 ports and merge their measurements.

    A worker that fails leaves the others waiting for it in a collective, so the
    first failure ends the rest at once instead of after RUN_TIMEOUT_S.
    """
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(config.np)]
    processes, logs = [], []
    for index in range(config.np):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        # Output goes to files: an unread pipe fills up and blocks the worker.
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        processes.append(subprocess.Popen(bench, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          env=child_env(TF_CONFIG=json.dumps(tf_config))))
    try:
        failed = _wait_all(processes, RUN_TIMEOUT_S)
        if failed is not None:
            index, status = failed
            logs[index].seek(0)
            raise RuntimeError(f"configuration {config.name}: MWMS worker {index} failed with exit status "
                               f"{status}: {logs[index].read()[-3000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    workers = [json.loads(Path(f"{result}.{index}").read_text()) for index in range(config.np)]
    return {**combine(config, workers), "name": config.name}


def _wait_all(processes: list[subprocess.Popen], timeout_s: float) -> tuple[int, int] | None:
    """Wait until every process exits; return (index, exit status) of the first failure, or None.

    Raises:
        subprocess.TimeoutExpired: some process still runs after timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [process.poll() for process in processes]
        for index, status in enumerate(statuses):
            if status:
                return index, status
        if all(status == 0 for status in statuses):
            return None
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(processes[0].args, timeout_s)
        time.sleep(0.5)


def run_rounds(configs: list[BenchConfig], repeats: int, out: str | None) -> list[dict]:
    """Run every configuration once per round, in order, so load changes hit all of them alike."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="hvdmri-bench-") as folder:
        for round_number in range(repeats):
            for config in configs:
                try:
                    line = run_config(config, Path(folder))
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    line = {**config.to_dict(), "error": str(error)}
                line["round"] = round_number + 1
                lines.append(line)
                text = json.dumps(line)
                print(text, flush=True)
                if out:
                    with open(out, "a") as stream:
                        stream.write(text + "\n")
    return lines


def runs_by_round(lines: list[dict]) -> dict[int, dict[str, dict]]:
    """Group the successful runs by round number, then by configuration name."""
    by_round: dict[int, dict[str, dict]] = {}
    for line in lines:
        if "error" not in line:
            by_round.setdefault(line["round"], {})[line["name"]] = line
    return by_round


def ratio_table(lines: list[dict], names: list[str]) -> str:
    """Format a Markdown table: images/s per configuration and its ratio to the first one.

    The ratio is taken within each round (A B A B), then summarised by median and range.
    """
    by_round = runs_by_round(lines)
    baseline = names[0]
    rows = ["| configuration | images/s (median) | images/s range | step s | ratio to "
            f"{baseline} (median) | ratio range | max peak RSS GiB | load avg 1 min |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        runs = [found[name] for found in by_round.values() if name in found]
        if not runs:
            rows.append(f"| {name} | failed | | | | | | |")
            continue
        speeds = [run["images_per_s"] for run in runs]
        ratios = [found[name]["images_per_s"] / found[baseline]["images_per_s"]
                  for found in by_round.values() if name in found and baseline in found]
        loads = [load for run in runs for load in (run["load_average_start"][0], run["load_average_end"][0])]
        ratio_text = f"{statistics.median(ratios):.3f}" if ratios else "n/a"
        ratio_range = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "n/a"
        rows.append(f"| {name} | {statistics.median(speeds):.2f} | {min(speeds):.2f}-{max(speeds):.2f} | "
                    f"{statistics.median(run['step_s'] for run in runs):.3f} | {ratio_text} | {ratio_range} | "
                    f"{max(max(run['peak_rss_gib_per_worker']) for run in runs):.2f} | "
                    f"{min(loads):.2f}-{max(loads):.2f} |")
    return "\n".join(rows)


def parse_ratio(spec: str, names: list[str]) -> tuple[str, str]:
    """Split NAME/NAME into its two configuration names, both of which must exist."""
    numerator, separator, denominator = spec.partition("/")
    unknown = [name for name in (numerator, denominator) if name not in names]
    if not separator or not numerator or not denominator:
        raise ValueError(f"--ratio {spec!r}: expected NAME/NAME, e.g. hvdmri/keras")
    if unknown:
        raise ValueError(f"--ratio {spec!r}: no configuration named {', '.join(unknown)} "
                         f"(configurations: {', '.join(names)})")
    return numerator, denominator


def pair_ratio_table(lines: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Format a Markdown table of images/s ratios for chosen pairs, one column per round.

    Each ratio divides two runs of the same round, so a change of machine load
    between rounds does not enter it. The spread across rounds shows what remains.
    """
    by_round = runs_by_round(lines)
    rounds = sorted(by_round)
    rows = ["| ratio of images/s | " + " | ".join(f"round {number}" for number in rounds) + " | median |",
            "| --- |" + " --- |" * (len(rounds) + 1)]
    for numerator, denominator in pairs:
        cells, ratios = [], []
        for number in rounds:
            found = by_round[number]
            if numerator in found and denominator in found:
                ratio = found[numerator]["images_per_s"] / found[denominator]["images_per_s"]
                ratios.append(ratio)
                cells.append(f"{ratio:.3f}")
            else:
                cells.append("failed")
        median = f"{statistics.median(ratios):.3f}" if ratios else "n/a"
        rows.append(f"| {numerator} / {denominator} | " + " | ".join(cells) + f" | {median} |")
    return "\n".join(rows)


def describe_run(line: dict) -> str:
    """Summarise a single run in one readable line, printed after its JSON line."""
    if "error" in line:
        return f"{line['name']}: failed: {line['error'][:200]}"
    workers = len(line["images_per_s_per_worker"])
    return (f"{line['name']}: {line['images_per_s']:.2f} images/s over {workers} worker(s), "
            f"median step {line['step_s']:.3f} s, peak RSS "
            f"{max(line['peak_rss_gib_per_worker']):.2f} GiB, {line['precision_used']}, "
            f"load {line['load_average_start'][0]:.1f} -> {line['load_average_end'][0]:.1f}")
