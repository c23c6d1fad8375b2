"""Multi-rank behaviour under a real horovodrun with 2 local workers (Gloo)."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import horovodrun, write_image
from hvdmri.data.listing import CLASS_NAMES

pytestmark = pytest.mark.slow
WORKER = str(Path(__file__).with_name("hvd_worker.py"))


def results(output: str) -> dict[int, dict]:
    found = {}
    for line in output.splitlines():
        if "RESULT " in line:
            data = json.loads(line.split("RESULT ", 1)[1])
            found[data["rank"]] = data
    return found


def test_split_is_identical_on_every_rank():
    run = horovodrun(2, [WORKER, "split"], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(run.stdout)
    assert sorted(found) == [0, 1]
    assert found[0]["digest"] == found[1]["digest"]


def test_uneven_shards_run_equal_steps(tmp_path):
    # 7 images: shards of 4 and 3.
    for i in range(7):
        write_image(tmp_path / CLASS_NAMES[i % 4] / f"img{i}.png", np.full((32, 32), 40 * i, np.uint8))
    run = horovodrun(2, [WORKER, "uneven", str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(run.stdout)
    assert sorted(found[r]["shard_size"] for r in (0, 1)) == [3, 4]
    for rank in (0, 1):
        assert found[rank]["steps_per_epoch"] == 2
        assert found[rank]["batches_run"] == 4  # 2 epochs x 2 steps


def test_metric_is_the_mean_over_all_images():
    run = horovodrun(2, [WORKER, "mean"], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(run.stdout)
    assert found[0]["local_rate"] == 0.75
    assert found[1]["local_rate"] == pytest.approx(1 / 3)
    for rank in (0, 1):
        assert found[rank]["val_accuracy"] == pytest.approx(4 / 7)
        assert found[rank]["mean"] == pytest.approx(4 / 7)


def test_batchnorm_statistics_are_averaged():
    run = horovodrun(2, [WORKER, "batchnorm"], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = results(run.stdout)
    for rank in (0, 1):
        assert found[rank]["mean"] == [1.5, 1.5, 1.5]
        assert found[rank]["variance"] == [6.0, 6.0, 6.0]
