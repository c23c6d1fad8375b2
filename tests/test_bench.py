"""The benchmark's JSON line and ratio table, and the memory model behind --memory-budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, descendants, horovodrun, run_module
from hvdmri.bench.compare import describe_run, pair_ratio_table, parse_ratio, ratio_table
from hvdmri.bench.measure import step_summary
from hvdmri.bench.results import read_results
from hvdmri.bench.scaling import Measured, estimate_table, measured_steps, ring_allreduce_s
from hvdmri.memory import (MEMORY_MODEL_GIB, check_memory_budget, estimate_worker_memory_gib, fit_memory_model,
                           largest_batch_size)
from hvdmri.memory import main as memory_main
from hvdmri.distributed import CYCLE_TIME_MS, UsageError

TINY = ["--image-size", "32", "--batch-size", "2", "--warmup-steps", "1", "--steps", "2", "--breakdown-steps", "1"]
LINE_FIELDS = ("name", "mode", "input", "np", "image_size", "batch_size", "precision_used", "world_size",
               "images_per_s", "images_per_s_per_worker", "step_s", "step_s_per_worker", "breakdown_s_per_worker",
               "peak_rss_gib_per_worker", "load_average_start", "load_average_end", "tensorflow", "horovod")


def json_lines(output: str) -> list[dict]:
    """The benchmark lines in output, also when horovodrun prefixed them with "[0]<stdout>:"."""
    return [json.loads(line[line.index("{"):]) for line in output.splitlines() if '{"name"' in line]


def test_step_summary_skips_warmup():
    # Step ends at 1, 3, 4, 6 s with 2 warm-up steps: timed steps last 1 s and 2 s.
    summary = step_summary([1.0, 3.0, 4.0, 6.0], warmup_steps=2, batch_size=4)
    assert summary["timed_steps"] == 2
    assert summary["step_s"] == pytest.approx(1.5)
    assert summary["step_s_min"] == pytest.approx(1.0)
    assert summary["step_s_max"] == pytest.approx(2.0)
    assert summary["images_per_s"] == pytest.approx(8 / 3)


def test_ratio_table_pairs_rounds():
    def line(name, speed, round_number):
        return {"name": name, "round": round_number, "images_per_s": speed, "step_s": 1.0,
                "peak_rss_gib_per_worker": [1.5], "load_average_start": [1.0, 0, 0], "load_average_end": [2.0, 0, 0]}

    # Round 1: b/a = 12/10 = 1.2; round 2: b/a = 9/10 = 0.9; median 1.05.
    lines = [line("a", 10, 1), line("b", 12, 1), line("a", 10, 2), line("b", 9, 2),
             {"name": "c", "round": 1, "error": "failed"}]
    rows = {row.split("|")[1].strip(): row for row in ratio_table(lines, ["a", "b", "c"]).splitlines()}
    assert "| 1.000 | 1.000-1.000 |" in rows["a"]
    assert "| 1.050 | 0.900-1.200 |" in rows["b"]
    assert "failed" in rows["c"]


def test_pair_ratios_per_round():
    def line(name, speed, round_number):
        return {"name": name, "round": round_number, "images_per_s": speed}

    # a/b: 10/8 = 1.25 in round 1, 6/8 = 0.75 in round 2, 9/6 = 1.5 in round 3; median 1.25.
    lines = [line("a", 10, 1), line("b", 8, 1), line("a", 6, 2), line("b", 8, 2), line("a", 9, 3),
             line("b", 6, 3), line("c", 4, 1), {"name": "c", "round": 2, "error": "failed"}]
    rows = pair_ratio_table(lines, [("a", "b"), ("c", "b")]).splitlines()
    assert rows[0] == "| ratio of images/s | round 1 | round 2 | round 3 | median |"
    assert rows[2] == "| a / b | 1.250 | 0.750 | 1.500 | 1.250 |"
    assert rows[3] == "| c / b | 0.500 | failed | failed | 0.500 |"


@pytest.mark.parametrize("spec, message", [("hvdmri", "expected NAME/NAME"), ("hvdmri/", "expected NAME/NAME"),
                                           ("hvdmri/plain", "no configuration named plain")])
def test_ratio_spec_is_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_ratio(spec, ["hvdmri", "keras"])
    assert parse_ratio("keras/hvdmri", ["hvdmri", "keras"]) == ("keras", "hvdmri")


def test_unknown_ratio_name_stops_before_any_run():
    run = run_module(["hvdmri.bench", "--config", "a=", "--config", "b=--mode keras", "--ratio", "a/c"], timeout=120)
    assert run.returncode == 2
    assert "no configuration named c" in run.stderr
    assert '{"name"' not in run.stdout


def test_single_run_summary_line():
    line = {"name": "run", "images_per_s": 5.123, "images_per_s_per_worker": [2.5, 2.623], "step_s": 3.1,
            "peak_rss_gib_per_worker": [1.9, 2.05], "precision_used": "mixed_bfloat16",
            "load_average_start": [0.5, 0, 0], "load_average_end": [1.25, 0, 0]}
    assert describe_run(line) == ("run: 5.12 images/s over 2 worker(s), median step 3.100 s, peak RSS 2.05 GiB, "
                                  "mixed_bfloat16, load 0.5 -> 1.2")
    assert describe_run({"name": "run", "error": "worker 1 died"}) == "run: failed: worker 1 died"


@pytest.mark.parametrize("precision", [*MEMORY_MODEL_GIB, "auto"])
def test_memory_model_grows_with_batch_and_size(precision):
    by_batch = [estimate_worker_memory_gib(batch, 224, precision) for batch in (1, 8, 16, 32, 64)]
    by_size = [estimate_worker_memory_gib(16, size, precision) for size in (32, 96, 160, 224, 320)]
    assert by_batch == sorted(by_batch)
    assert len(set(by_batch)) == len(by_batch)
    assert by_size == sorted(by_size)
    assert len(set(by_size)) == len(by_size)


def test_default_batch_leaves_two_gib_of_eight():
    # The defaults of hvdmri.train: batch 16 at 224 px.
    assert estimate_worker_memory_gib(16, 224, "auto") <= 6.0


def test_largest_batch_fits_and_next_does_not():
    budget = 5.0
    largest = largest_batch_size(budget, 224, "float32")
    assert largest >= 1
    assert estimate_worker_memory_gib(largest, 224, "float32") <= budget
    assert estimate_worker_memory_gib(largest + 1, 224, "float32") > budget
    assert largest_batch_size(0.1, 224, "float32") == 0


def test_fit_recovers_exact_coefficients():
    # Points on rss = 1.5 + 0.1 * batch * (size/224)^2; at 112 px a batch of 16 counts as 4.
    points = [(8, 224, 2.3), (16, 224, 3.1), (16, 112, 1.9), (64, 224, 7.9)]
    fixed, per_image = fit_memory_model(points)
    assert fixed == pytest.approx(1.5)
    assert per_image == pytest.approx(0.1)


def test_fit_needs_two_different_points():
    with pytest.raises(ValueError, match="at least two"):
        fit_memory_model([(8, 224, 2.0), (8, 224, 2.1)])


def test_memory_budget_names_largest_batch():
    with pytest.raises(UsageError) as raised:
        check_memory_budget(4.0, 64, 224, "float32")
    largest = largest_batch_size(4.0, 224, "float32")
    assert f"the largest batch size that fits is {largest}" in str(raised.value)
    assert "--memory-budget 4" in str(raised.value)
    check_memory_budget(4.0, largest, 224, "float32")


def test_memory_budget_below_one_image():
    fixed = estimate_worker_memory_gib(0, 224, "float32")
    per_image = estimate_worker_memory_gib(1, 224, "float32") - fixed
    with pytest.raises(UsageError, match="even batch size 1 does not fit; lower --image-size"):
        check_memory_budget(fixed + per_image / 2, 8, 224, "float32")


def test_memory_budget_below_fixed_part():
    with pytest.raises(UsageError, match="the model alone needs about .* GiB at any batch or image size"):
        check_memory_budget(0.2, 8, 32, "float32")


@pytest.mark.slow
def test_train_rejects_batch_over_budget(phantom_dir, tmp_path):
    budget = estimate_worker_memory_gib(8, 224, "float32") + 0.01
    run = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", "none", "--precision", "float32",
                      "--batch-size", "64", "--memory-budget", f"{budget:.3f}",
                      "--run-dir", str(tmp_path / "run")], timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--memory-budget" in run.stderr
    assert "the largest batch size that fits is 8 (pass --batch-size 8)" in run.stderr
    assert not (tmp_path / "run").exists()


SHOW_CYCLE_TIME = """
import os, sys
from hvdmri.cli import run_command
from hvdmri.distributed import setup_horovod
status = run_command("setup", lambda: setup_horovod(1))
print("HOROVOD_CYCLE_TIME=" + os.environ.get("HOROVOD_CYCLE_TIME", "unset"))
sys.exit(status)
"""


def run_setup_horovod(**variables: str) -> subprocess.CompletedProcess:
    """Run setup_horovod in a fresh process with only these Horovod variables exported."""
    env = clean_env()
    for name in ("HOROVOD_CYCLE_TIME", "HOROVOD_AUTOTUNE"):
        env.pop(name, None)
    env.update(variables)
    return subprocess.run([sys.executable, "-c", SHOW_CYCLE_TIME], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("exported, logged", [(None, f"{CYCLE_TIME_MS} ms"), ("4", "4 ms"), ("0.5", "0.5 ms"),
                                              ("0", "0 ms")])
def test_setup_horovod_sets_cycle_time_unless_given(exported, logged):
    run = run_setup_horovod(**({"HOROVOD_CYCLE_TIME": exported} if exported else {}))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"HOROVOD_CYCLE_TIME={exported or CYCLE_TIME_MS}\n" in run.stdout
    assert f"cycle time {logged}\n" in run.stdout


# Horovod's strtof reads each of these as another number than Python's float() (0 for text,
# 1 for "1_000", inf for "1e39"), or the cycle would stall every collective (1001 ms).
@pytest.mark.parametrize("exported", ["abc", "", "-3", "-0", "25ms", "nan", "inf", "1_000", "\uff14", "1e39",
                                      "1001"])
def test_setup_horovod_rejects_bad_cycle_time(exported):
    run = run_setup_horovod(HOROVOD_CYCLE_TIME=exported)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"setup: error: HOROVOD_CYCLE_TIME={exported!r} is not a number of milliseconds from 0 to 1000" \
        in run.stderr


@pytest.mark.parametrize("autotune, on", [("1", True), ("2", True), ("0", False), ("false", False), ("-1", False)])
def test_setup_horovod_cycle_time_with_autotune(autotune, on):
    # Horovod's autotuner runs when strtol(HOROVOD_AUTOTUNE) > 0; only then is the cycle left to it.
    run = run_setup_horovod(HOROVOD_AUTOTUNE=autotune)
    assert run.returncode == 0, run.stdout + run.stderr
    if on:
        assert "HOROVOD_CYCLE_TIME=unset\n" in run.stdout
        assert "cycle time tuned by Horovod's autotuner" in run.stdout
    else:
        assert f"HOROVOD_CYCLE_TIME={CYCLE_TIME_MS}\n" in run.stdout
        assert f"cycle time {CYCLE_TIME_MS} ms" in run.stdout


def test_cycle_time_only_with_horovod():
    run = run_module(["hvdmri.bench", "--mode", "keras", "--cycle-time-ms", "5"], timeout=120)
    assert run.returncode == 2
    assert "--cycle-time-ms applies to --mode hvdmri only" in run.stderr


def test_real_input_without_data_is_rejected():
    run = run_module(["hvdmri.bench", "--input", "real"], timeout=120)
    assert run.returncode == 2
    assert "--input real needs --data DIR" in run.stderr


@pytest.mark.slow
def test_compare_prints_lines_and_ratios(tmp_path):
    out = tmp_path / "bench.jsonl"
    run = run_module(["hvdmri.bench", *TINY, "--precision", "float32", "--out", str(out),
                      "--config", "hvdmri=--cycle-time-ms 7", "--config", "keras=--mode keras",
                      "--ratio", "keras/hvdmri"],
                     timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = json_lines(run.stdout)
    assert [line["name"] for line in lines] == ["hvdmri", "keras"]
    assert [json.loads(text)["name"] for text in out.read_text().splitlines()] == ["hvdmri", "keras"]
    for line in lines:
        for field in LINE_FIELDS:
            assert field in line, field
        assert line["images_per_s"] > 0
        assert line["precision_used"] == "float32"
        assert 0 < line["peak_rss_gib_per_worker"][0] < 8
    assert set(lines[0]["breakdown_s_per_worker"][0]) == {"input_wait", "compute", "allreduce", "update"}
    assert lines[1]["breakdown_s_per_worker"] == [None]
    # The flag reached Horovod's environment; plain Keras runs no Horovod.
    assert lines[0]["horovod_cycle_time_ms"] == 7
    assert lines[1]["horovod_cycle_time_ms"] is None
    table = [row for row in run.stdout.splitlines() if row.startswith("| ")]
    assert table[0].startswith("| configuration |")
    assert table[2].startswith("| hvdmri |")
    assert "| 1.000 |" in table[2]
    assert table[3].startswith("| keras |")
    keras_ratio = lines[1]["images_per_s"] / lines[0]["images_per_s"]
    assert table[4].startswith("| ratio of images/s | round 1 | median |")
    assert table[6] == f"| keras / hvdmri | {keras_ratio:.3f} | {keras_ratio:.3f} |"


def alive(pid: int) -> bool:
    """Return whether the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def bench_workers(parent: int) -> list[int]:
    pids = []
    for pid in descendants(parent):
        try:
            if b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_sigterm_ends_comparison_and_children(tmp_path):
    out = tmp_path / "bench.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "hvdmri.bench", *TINY, "--np", "2", "--steps", "500",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_env(TMPDIR=str(tmp_path)))
    deadline = time.time() + 300
    while len(bench_workers(process.pid)) < 2:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the two workers did not start within 300 s"
        time.sleep(0.5)
    children = descendants(process.pid)

    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        assert f"interrupted; the finished runs are in {out}" in stderr
        # horovodrun's helpers stop the workers once horovodrun is gone; give them its 5 s and more.
        deadline = time.time() + 60
        while any(alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in children if alive(pid)]
        assert not list(tmp_path.glob("hvdmri-bench-*"))
    finally:
        # A failed run must not leave workers behind for the rest of the suite.
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_mwms_two_workers_report_both(tmp_path):
    run = run_module(["hvdmri.bench", *TINY, "--precision", "float32", "--mode", "mwms", "--np", "2"], timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = json_lines(run.stdout)
    assert len(lines) == 1
    line = lines[0]
    assert (line["mode"], line["world_size"]) == ("mwms", 2)
    assert len(line["images_per_s_per_worker"]) == 2
    assert all(speed > 0 for speed in line["images_per_s_per_worker"])
    # Only hvdmri mode splits the step, because MWMS has no separate allreduce to time.
    assert line["breakdown_s_per_worker"] == [None, None]
    assert "run: " in run.stdout
    assert "images/s over 2 worker(s)" in run.stdout


@pytest.mark.slow
def test_horovodrun_two_workers_report_both(tmp_path):
    run = horovodrun(2, ["-m", "hvdmri.bench", *TINY, "--fp16-allreduce"], timeout=900,
                     extra=["--cycle-time-ms", "3"])
    assert run.returncode == 0, run.stdout + run.stderr
    lines = json_lines(run.stdout)
    assert len(lines) == 1
    line = lines[0]
    assert line["world_size"] == 2
    assert line["np"] == 2
    assert line["fp16_allreduce"] is True
    # horovodrun's flag wins over hvdmri's default.
    assert line["horovod_cycle_time_ms"] == 3
    assert len(line["images_per_s_per_worker"]) == 2
    assert line["images_per_s"] == pytest.approx(sum(line["images_per_s_per_worker"]), rel=1e-3)
    assert len(line["peak_rss_gib_per_worker"]) == 2
    assert all(parts["allreduce"] > 0 for parts in line["breakdown_s_per_worker"])


def test_ring_allreduce_volume():
    assert ring_allreduce_s(1, 100e6, 100.0) == 0
    # 2 * 3/4 of 100 MB at 100 MB/s.
    assert ring_allreduce_s(4, 100e6, 100.0) == pytest.approx(1.5)
    assert ring_allreduce_s(8, 100e6, 100.0) == pytest.approx(1.75)


def test_scaling_uses_single_worker_medians():
    def line(name, step_s, **extra):
        return {"name": name, "mode": "hvdmri", "world_size": 1, "precision_used": "float32", "batch_size": 10,
                "image_size": 224, "step_s": step_s, **extra}

    lines = [line("a", 1.0), line("a", 3.0), line("a", 1.2), line("b", 2.0, world_size=2),
             line("c", 2.0, mode="keras"), {"name": "a", "error": "failed"}, line("a", 0.1, image_size=32)]
    runs = measured_steps(lines)
    # The 32 px run of the same name is a configuration of its own.
    assert [(run.name, run.image_size, run.step_s, run.rounds) for run in runs] == [("a", 224, 1.2, 3),
                                                                                  ("a", 32, 0.1, 1)]


def test_scaling_table_arithmetic():
    runs = [Measured("a", 224, "float32", 10, 1.0, 1)]
    rows = estimate_table(runs, [1, 4], gradient_bytes=100e6, link_mb_s=100.0).splitlines()
    assert rows[2] == "| a | 224 | float32 | 10 | 1 | 0.00 / 0.00 | 10.0 / 10.0 | 10.0 / 10.0 | 1.0 / 1.0 |"
    # 4 nodes: network 1.5 s (fp16 0.75 s); 40 images per step over 2.5 s, 1.75 s, 1.5 s and 1.0 s.
    assert rows[3] == "| a | 224 | float32 | 10 | 4 | 1.50 / 0.75 | 16.0 / 22.9 | 26.7 / 40.0 | 1.6 / 2.3 |"


def test_scaling_without_single_worker_runs(tmp_path):
    results = tmp_path / "bench.jsonl"
    results.write_text(json.dumps({"name": "np2", "mode": "hvdmri", "world_size": 2, "step_s": 1.0, "batch_size": 8,
                                   "image_size": 224, "precision_used": "float32"}) + "\n")
    run = run_module(["hvdmri.bench.scaling", str(results)], timeout=120)
    assert run.returncode == 2
    assert "no successful single-worker hvdmri run" in run.stderr


def test_memory_fit_from_files(tmp_path, capsys):
    def line(batch, rss, **extra):
        return {"name": f"b{batch}", "mode": "hvdmri", "world_size": 1, "precision_used": "float32",
                "batch_size": batch, "image_size": 224, "peak_rss_gib_per_worker": [rss], **extra}

    # On rss = 1.5 + 0.1 * batch; the two-worker, plain-Keras and failed lines must not enter the fit.
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(item) for item in [
        line(8, 2.3), line(16, 3.1), line(16, 9.0, world_size=2, peak_rss_gib_per_worker=[9.0, 9.0])]) + "\n")
    second.write_text("\n".join(json.dumps(item) for item in [
        line(64, 7.9), line(32, 0.5, mode="keras"), {"name": "b32", "error": "out of memory"}]) + "\n")
    assert memory_main([str(first), str(second)]) == 0
    output = capsys.readouterr().out
    assert "float32: a = 1.500 GiB, b = 0.1000 GiB per 224 px image (3 runs," in output
    assert "mixed_bfloat16" not in output


def test_memory_fit_without_runs(tmp_path):
    results = tmp_path / "bench.jsonl"
    results.write_text(json.dumps({"name": "keras", "mode": "keras", "world_size": 1}) + "\n")
    with pytest.raises(SystemExit) as raised:
        memory_main([str(results)])
    assert raised.value.code == 2


def test_wait_all_returns_first_failure():
    import subprocess
    import sys
    import time

    from hvdmri.bench.compare import _wait_all

    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    try:
        assert _wait_all([waiting, failing], timeout_s=50) == (1, 3)
        # It returned on the failure, not after the other process's 60 s.
        assert time.monotonic() - started < 30
    finally:
        waiting.kill()
        waiting.wait()
    done = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert _wait_all(done, timeout_s=50) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _wait_all([sleeper], timeout_s=1)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("text, message", [
    ("5\n", "line 1: expected a JSON object, got int"),
    ('{"name": "a", "error": "x"}\n{"name": "b"}\n', "line 2: not a benchmark run, missing"),
    ('{"name": "a", "error": "x"}\nnot json\n', "line 2: not JSON"),
])
def test_results_reader_names_bad_line(tmp_path, text, message):
    results = tmp_path / "bench.jsonl"
    results.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_results([str(results)], ("name", "step_s"))


def test_results_reader_rejects_binary(tmp_path):
    results = tmp_path / "scan.jpg"
    results.write_bytes(bytes([0xFF, 0xD8, 0xFF, 0xE0, 0x80, 0x81]))
    with pytest.raises(ValueError, match="not a text file"):
        read_results([str(results)], ("name",))


@pytest.mark.parametrize("spec", ["a/b=", "../../x=", ".hidden="])
def test_config_name_must_be_plain(spec):
    run = run_module(["hvdmri.bench", "--config", spec], timeout=120)
    assert run.returncode == 2
    assert "a name is letters, digits" in run.stderr


def test_unwritable_out_stops_before_any_run(tmp_path):
    run = run_module(["hvdmri.bench", "--out", str(tmp_path / "missing" / "out.jsonl")], timeout=120)
    assert run.returncode == 2
    assert "--out" in run.stderr
    assert "No such file or directory" in run.stderr
    assert '{"name"' not in run.stdout


def test_compare_flags_rejected_in_worker():
    run = run_module(["hvdmri.bench", "--worker", "--config", "a="], timeout=120)
    assert run.returncode == 2
    assert "start the comparison without horovodrun" in run.stderr
