"""python -m hvdmri.evaluate: the files it writes, unreadable images, bad input, and 2 ranks against 1.

Most tests call main() in this process with Horovod replaced by a one-worker
stand-in: setup_horovod sizes TensorFlow's thread pools, which fails once another
test has run TensorFlow. The CLI and horovodrun tests run real subprocesses.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, horovodrun, make_untrained_run, models_loaded_once, run_module, write_image
from conftest import noise_image as scan
from hvdmri import evaluate, predict, runs
from hvdmri.data.decode import decode_image
from hvdmri.data.listing import Listing
from hvdmri.distributed import UsageError, Workers

IMAGE_SIZE = 64
OUTPUT_FILES = ("metrics.json", "predictions.csv", "confusion_matrix.csv", "confusion_matrix.png",
                "roc_curves.png", "reliability_diagram.png", "report.md")
# The files write_test_folder() plants that cannot be decoded, with a phrase of the
# reason. corrupt.jpg has JPEG start and end markers, so the listing accepts it and
# only the decoder in the input pipeline rejects it.
UNREADABLE = {
    "glioma/corrupt.jpg": "not a decodable image",
    "meningioma/empty.jpg": "empty file (0 bytes)",
    "notumor/fake.png": "not a JPEG or PNG file",
}
CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16 + b"\xff\xd9"


def make_run(folder: Path, image_size: int = IMAGE_SIZE, seed: int = 11) -> Path:
    return make_untrained_run(folder, image_size, seed)


def write_test_folder(root: Path) -> Path:
    """3 readable images per class in mixed formats and sizes, plus the UNREADABLE files."""
    for label, name in enumerate(CLASSES):
        for i in range(3):
            suffix = ".jpg" if i == 1 else ".png"
            write_image(root / name / f"{name}_{i}{suffix}", scan(10 * label + i))
    write_image(root / "pituitary" / "pituitary_wide.png", scan(99, 40, 90))
    (root / "pituitary" / "pituitary_0.png").unlink()
    write_image(root / "pituitary" / "pituitary_16bit.png",
                np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16))
    (root / "pituitary" / "pituitary_2.png").unlink()
    (root / "glioma" / "corrupt.jpg").write_bytes(CORRUPT_JPEG)
    (root / "meningioma" / "empty.jpg").write_bytes(b"")
    (root / "notumor" / "fake.png").write_text("a text file with an image extension")
    (root / "glioma" / "notes.txt").write_text("not an image extension: the listing leaves it out")
    return root


@pytest.fixture(scope="module")
def one_worker():
    """Evaluate in this process as a single Horovod worker, loading each run folder's model once."""
    with pytest.MonkeyPatch.context() as patch, models_loaded_once(patch):
        patch.setattr(evaluate, "setup_horovod", lambda threads=None: Workers(0, 0, 1, 1))
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
    return write_test_folder(tmp_path_factory.mktemp("data") / "Testing")


@pytest.fixture(scope="module")
def evaluated(one_worker, run_dir, test_dir, tmp_path_factory):
    """One evaluation with the default output folder and Grad-CAM; returns (output folder, Grad-CAM folder)."""
    gradcam_dir = tmp_path_factory.mktemp("gradcam")
    code = evaluate.main(["--model", str(run_dir), "--data", str(test_dir), "--batch-size", "5",
                          "--gradcam", str(gradcam_dir)])
    assert code == 0
    return run_dir / "evaluation" / "Testing", gradcam_dir


def strict_json(path: Path):
    def reject(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_default_output_folder_has_every_file(evaluated):
    out_dir, _ = evaluated
    for name in OUTPUT_FILES:
        assert (out_dir / name).is_file(), name
        assert (out_dir / name).stat().st_size > 0, name


def test_metrics_json_contents(evaluated):
    metrics = strict_json(evaluated[0] / "metrics.json")
    assert metrics["class_names"] == CLASSES
    assert metrics["images_evaluated"] == 12
    assert metrics["support"] == 12
    for key in ("accuracy", "balanced_accuracy", "cohen_kappa", "roc_auc_macro", "glioma_recall",
                "notumor_precision"):
        assert key in metrics
    for name in CLASSES:
        assert set(metrics["per_class"][name]) == {"precision", "recall", "f1", "support", "roc_auc"}
        assert metrics["per_class"][name]["support"] == 3
    for average in ("macro_avg", "weighted_avg"):
        assert set(metrics[average]) == {"precision", "recall", "f1"}
    assert np.asarray(metrics["confusion_matrix"]).sum() == 12
    for key in ("sensitivity", "specificity", "roc_auc"):
        assert key in metrics["screening"]
    assert metrics["calibration"]["n_bins"] == 10
    assert len(metrics["calibration"]["bins"]) == 10
    assert 0.0 <= metrics["calibration"]["ece"] <= 1.0


def test_unreadable_images_counted_and_listed(evaluated):
    out_dir, _ = evaluated
    metrics = strict_json(out_dir / "metrics.json")
    assert metrics["images_found"] == 15
    assert metrics["images_unreadable"] == 3
    listed = {item["path"]: item["reason"] for item in metrics["unreadable_images"]}
    assert set(listed) == set(UNREADABLE)
    for path, reason in UNREADABLE.items():
        assert reason in listed[path]

    report = (out_dir / "report.md").read_text()
    for path in UNREADABLE:
        assert f"`{path}`" in report
    predicted = {row["path"] for row in read_csv(out_dir / "predictions.csv")}
    assert not predicted & set(UNREADABLE)


def test_predictions_csv_one_row_per_image(evaluated, test_dir):
    rows = read_csv(evaluated[0] / "predictions.csv")
    assert list(rows[0]) == ["path", "true_class", "predicted_class", *(f"p_{name}" for name in CLASSES)]
    assert len(rows) == 12
    assert len({row["path"] for row in rows}) == 12
    for row in rows:
        assert row["true_class"] == Path(row["path"]).parts[0]
        probabilities = [float(row[f"p_{name}"]) for name in CLASSES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted_class"] == CLASSES[int(np.argmax(probabilities))]
        assert (test_dir / row["path"]).is_file()


def test_confusion_csv_matches_metrics(evaluated):
    out_dir, _ = evaluated
    metrics = strict_json(out_dir / "metrics.json")
    with open(out_dir / "confusion_matrix.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == CLASSES
    assert [row[0] for row in table[1:]] == CLASSES
    assert [[int(cell) for cell in row[1:]] for row in table[1:]] == metrics["confusion_matrix"]


def test_report_links_images_relative(evaluated):
    out_dir, _ = evaluated
    report = (out_dir / "report.md").read_text()
    for image in ("confusion_matrix.png", "roc_curves.png", "reliability_diagram.png"):
        assert f"]({image})" in report
        assert decode_image(out_dir / image).shape[2] == 3
    assert "| glioma |" in report
    assert "## Calibration" in report


def test_predict_agrees_with_evaluate(evaluated, run_dir, test_dir, tmp_path, capsys):
    rows = read_csv(evaluated[0] / "predictions.csv")
    csv_path = tmp_path / "predict.csv"
    code = predict.main(["--model", str(run_dir), *(str(test_dir / row["path"]) for row in rows),
                         "--csv", str(csv_path)])
    capsys.readouterr()
    assert code == 0

    predicted = read_csv(csv_path)
    assert [Path(row["path"]) for row in predicted] == [test_dir / row["path"] for row in rows]
    for by_predict, by_evaluate in zip(predicted, rows):
        assert by_predict["predicted_class"] == by_evaluate["predicted_class"]
        for name in CLASSES:
            assert float(by_predict[f"p_{name}"]) == pytest.approx(float(by_evaluate[f"p_{name}"]), abs=1e-5)


def test_gradcam_png_per_readable_image(evaluated, test_dir):
    _, gradcam_dir = evaluated
    written = sorted(str(path.relative_to(gradcam_dir)) for path in gradcam_dir.rglob("*.png"))
    rows = read_csv(evaluated[0] / "predictions.csv")
    assert written == sorted(str(Path(row["path"]).with_suffix("")) + "_gradcam.png" for row in rows)
    wide = decode_image(gradcam_dir / "pituitary" / "pituitary_wide_gradcam.png")
    assert wide.shape == (40, 180, 3)


def test_decode_failures_named_with_reason(test_dir):
    paths = ["glioma/corrupt.jpg", "glioma/glioma_0.png", "meningioma/meningioma_1.jpg"]
    listing = Listing(root=test_dir, class_names=tuple(CLASSES), paths=paths, labels=[0, 0, 1])
    # The pipeline returned images 1 and 2 only.
    failures = evaluate.find_decode_failures(listing, np.array([1, 2]))
    assert failures == [("glioma/corrupt.jpg",
                         "not a decodable image (corrupt, truncated or not JPEG/PNG)")]


def test_nan_probabilities_rejected(test_dir, tmp_path):
    listing = Listing(root=test_dir, class_names=tuple(CLASSES), paths=["glioma/a.png", "glioma/b.png"],
                      labels=[0, 0])
    probabilities = np.array([[0.25, 0.25, 0.25, 0.25], [np.nan, np.nan, np.nan, np.nan]])
    with pytest.raises(UsageError, match=r"NaN or infinite probabilities for 1 of 2 images \(first: glioma/b.png\)"):
        evaluate.check_finite(listing, np.array([0, 1]), probabilities, tmp_path)


@pytest.mark.parametrize("flag, value", [("--screening-threshold", "1.5"), ("--calibration-bins", "0"),
                                         ("--batch-size", "x")])
def test_bad_flag_values(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "run", "--data", "data", flag, value])
    errors = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert len(errors) == 1
    assert flag in errors[0]


def test_missing_class_folder_is_allowed(one_worker, run_dir, tmp_path, capsys):
    data = tmp_path / "Partial"
    for label, name in enumerate(CLASSES[:3]):
        for i in range(2):
            write_image(data / name / f"{i}.png", scan(label * 5 + i))
    out_dir = tmp_path / "out"
    code = evaluate.main(["--model", str(run_dir), "--data", str(data), "--out", str(out_dir)])
    capsys.readouterr()
    assert code == 0

    metrics = strict_json(out_dir / "metrics.json")
    assert metrics["per_class"]["pituitary"]["support"] == 0
    assert metrics["per_class"]["pituitary"]["recall"] is None
    assert metrics["per_class"]["pituitary"]["roc_auc"] is None
    assert metrics["images_unreadable"] == 0
    assert "None." in (out_dir / "report.md").read_text()
    assert not (run_dir / "evaluation" / "Partial").exists()


def test_unknown_class_folder(one_worker, run_dir, tmp_path, capsys):
    data = tmp_path / "Odd"
    write_image(data / "glioma" / "a.png", scan(1))
    write_image(data / "astrocytoma" / "b.png", scan(2))
    code = evaluate.main(["--model", str(run_dir), "--data", str(data), "--out", str(tmp_path / "out")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(errors) == 1
    assert "class folders the model does not know: astrocytoma" in errors[0]
    assert not (tmp_path / "out").exists()


def test_missing_data_folder(one_worker, run_dir, tmp_path, capsys):
    code = evaluate.main(["--model", str(run_dir), "--data", str(tmp_path / "absent")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2
    assert errors == [f"hvdmri.evaluate: error: data folder not found: {tmp_path / 'absent'}"]


def test_no_decodable_image(one_worker, run_dir, tmp_path, capsys):
    data = tmp_path / "Broken"
    (data / "glioma").mkdir(parents=True)
    (data / "glioma" / "cut.jpg").write_bytes(CORRUPT_JPEG)
    (data / "glioma" / "empty.png").write_bytes(b"")
    code = evaluate.main(["--model", str(run_dir), "--data", str(data), "--out", str(tmp_path / "out")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(errors) == 1
    assert "none of the 2 image files" in errors[0]
    assert not (tmp_path / "out").exists()


def test_run_folder_without_model(one_worker, test_dir, tmp_path, capsys):
    runs.write_json(tmp_path / runs.CLASSES_FILE, {"class_names": CLASSES})
    code = evaluate.main(["--model", str(tmp_path), "--data", str(test_dir)])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2
    assert len(errors) == 1
    assert "model.keras not found" in errors[0]
    assert str(tmp_path) in errors[0]


def test_cli_one_line_error(test_dir, tmp_path):
    result = run_module(["hvdmri.evaluate", "--model", str(tmp_path), "--data", str(test_dir)], timeout=300)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "no trained model (model.keras not found)" in errors[0]
    assert "Traceback" not in result.stderr


def test_help_shows_example():
    result = run_module(["hvdmri.evaluate", "--help"], timeout=120)
    assert result.returncode == 0
    assert "python -m hvdmri.evaluate --model runs/" in result.stdout
    assert "RUN_DIR/evaluation/<name of the test folder>" in result.stdout


@pytest.mark.slow
def test_two_ranks_match_one_process(evaluated, run_dir, test_dir, tmp_path):
    out_dir = tmp_path / "np2"
    result = horovodrun(2, ["-m", "hvdmri.evaluate", "--model", str(run_dir), "--data", str(test_dir),
                            "--out", str(out_dir), "--batch-size", "2", "--threads", "1"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single = strict_json(evaluated[0] / "metrics.json")
    double = strict_json(out_dir / "metrics.json")
    assert double["world_size"] == 2
    for key in ("images_found", "images_evaluated", "images_unreadable", "unreadable_images",
                "confusion_matrix", "support", "accuracy"):
        assert double[key] == single[key], key
    for name in CLASSES:
        assert double["per_class"][name]["support"] == single["per_class"][name]["support"]

    one, two = read_csv(evaluated[0] / "predictions.csv"), read_csv(out_dir / "predictions.csv")
    assert [row["path"] for row in two] == [row["path"] for row in one]
    assert [row["predicted_class"] for row in two] == [row["predicted_class"] for row in one]
    for a, b in zip(one, two):
        for name in CLASSES:
            assert float(b[f"p_{name}"]) == pytest.approx(float(a[f"p_{name}"]), abs=1e-5)
    ece_one, ece_two = single["calibration"]["ece"], double["calibration"]["ece"]
    assert math.isclose(ece_one, ece_two, abs_tol=1e-5)


def test_exclude_duplicates_of_training(one_worker, run_dir, tmp_path, capsys):
    test_dir, train_dir = tmp_path / "Testing", tmp_path / "Training"
    for label, name in enumerate(CLASSES):
        for i in range(2):
            write_image(test_dir / name / f"te_{i}.png", scan(200 + 10 * label + i))
        write_image(train_dir / name / "tr_0.png", scan(300 + label))
    # One byte-identical leak; the check must find it among unrelated random scans.
    (train_dir / "glioma" / "copy_of_test.png").write_bytes((test_dir / "glioma" / "te_1.png").read_bytes())

    out_dir = tmp_path / "out"
    code = evaluate.main(["--model", str(run_dir), "--data", str(test_dir), "--out", str(out_dir),
                          "--exclude-duplicates-of", str(train_dir)])
    capsys.readouterr()
    assert code == 0
    metrics = strict_json(out_dir / "metrics.json")
    assert metrics["duplicates_of_training_set_aside"] == 1
    assert metrics["duplicates_of_training"] == ["glioma/te_1.png"]
    assert metrics["images_evaluated"] == 7
    assert metrics["per_class"]["glioma"]["support"] == 1
    assert "set aside: 1 test images" in (out_dir / "report.md").read_text()


def test_exclude_duplicates_of_missing_folder(one_worker, run_dir, tmp_path, capsys):
    test_dir = tmp_path / "Testing"
    for label, name in enumerate(CLASSES):
        write_image(test_dir / name / "te.png", scan(400 + label))
    code = evaluate.main(["--model", str(run_dir), "--data", str(test_dir), "--out", str(tmp_path / "out"),
                          "--exclude-duplicates-of", str(tmp_path / "nowhere")])
    assert code == 2
    assert "folder not found" in capsys.readouterr().err
