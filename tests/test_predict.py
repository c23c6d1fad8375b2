"""python -m hvdmri.predict: the table, --json/--csv/--gradcam, and every kind of bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, make_untrained_run, models_loaded_once, run_module, write_image
from conftest import noise_image as scan
from hvdmri import runs
from hvdmri.data.decode import decode_image, load_image, preprocess
from hvdmri.predict import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, main

IMAGE_SIZE = 64


def make_run(folder: Path, image_size: int = IMAGE_SIZE, seed: int = 5) -> Path:
    return make_untrained_run(folder, image_size, seed)


@pytest.fixture(scope="module", autouse=True)
def load_each_model_once():
    """Load each run folder's model once per module: a ResNet-50 .keras file takes seconds to load."""
    with pytest.MonkeyPatch.context() as patch, models_loaded_once(patch):
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_image(folder / "scans" / "a.png", scan(1))
    write_image(folder / "scans" / "b.jpg", scan(2, 80, 50))
    write_image(folder / "scans" / "deeper" / "c.png", scan(3))
    (folder / "scans" / "notes.txt").write_text("not an image, and not picked up from a folder")
    (folder / "scans" / ".hidden.png").write_bytes(b"left out: hidden files are skipped in folders")
    write_image(folder / "single.png", scan(4))
    return folder


def predict(capsys, *argv):
    code = main([str(arg) for arg in argv])
    output = capsys.readouterr()
    return code, output.out, output.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_table_for_folder_and_file(run_dir, images, capsys):
    code, out, err = predict(capsys, "--model", run_dir, images / "scans", images / "single.png")

    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].split() == ["path", "predicted", *CLASSES]
    rows = [line.split() for line in lines[1:]]
    assert [Path(row[0]).name for row in rows] == ["a.png", "b.jpg", "c.png", "single.png"]
    for row in rows:
        assert row[1] in CLASSES
        probabilities = [float(value) for value in row[2:]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
        assert row[1] == CLASSES[int(np.argmax(probabilities))]
    assert error_lines(err) == []


def test_same_preprocessing_as_training(run_dir, images, tmp_path, capsys):
    path = images / "scans" / "b.jpg"
    code, _, err = predict(capsys, "--model", run_dir, path, "--json", tmp_path / "p.json")
    assert code == EXIT_OK, err

    written = json.loads((tmp_path / "p.json").read_text())
    model, _, _ = runs.load_trained_model(run_dir)
    expected = model(preprocess(load_image(path, IMAGE_SIZE)[None]), training=False).numpy()[0]
    probabilities = written["predictions"][0]["probabilities"]
    np.testing.assert_allclose([probabilities[name] for name in CLASSES], expected, atol=1e-6)


def test_json_and_csv_outputs(run_dir, images, tmp_path, capsys):
    json_path, csv_path = tmp_path / "out.json", tmp_path / "out.csv"
    code, _, err = predict(capsys, "--model", run_dir, images / "scans", "--json", json_path, "--csv", csv_path)
    assert code == EXIT_OK, err

    written = json.loads(json_path.read_text())
    assert written["class_names"] == CLASSES
    assert len(written["predictions"]) == 3
    assert written["failed"] == []
    first = written["predictions"][0]
    assert set(first["probabilities"]) == set(CLASSES)
    assert first["predicted_class"] == max(first["probabilities"], key=first["probabilities"].get)

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "predicted_class", *(f"p_{name}" for name in CLASSES), "error"]
    assert len(rows) == 3
    for row, record in zip(rows, written["predictions"]):
        assert row["path"] == record["path"]
        assert row["predicted_class"] == record["predicted_class"]
        assert float(row["p_glioma"]) == pytest.approx(record["probabilities"]["glioma"], abs=1e-6)
        assert row["error"] == ""


def test_class_names_come_from_run_folder(run_dir, tmp_path, images, capsys):
    names = ["alpha", "beta", "gamma", "delta"]
    (tmp_path / runs.MODEL_FILE).write_bytes((run_dir / runs.MODEL_FILE).read_bytes())
    runs.write_json(tmp_path / runs.CLASSES_FILE, {"class_names": names})
    code, out, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_OK, err
    assert out.splitlines()[0].split() == ["path", "predicted", *names]
    assert out.splitlines()[1].split()[1] in names


def write_bad(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zero-byte":
        path = folder / "empty.jpg"
        path.write_bytes(b"")
    elif kind == "not an image":
        path = folder / "report.png"
        path.write_text("plain text with an image extension")
    elif kind == "truncated":
        path = folder / "cut.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 16)
    elif kind == "corrupt":
        path = folder / "corrupt.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 16 + b"\xff\xd9")
    else:
        path = folder / "absent.jpg"
    return path


BAD_INPUTS = [
    ("zero-byte", "empty file (0 bytes)"),
    ("not an image", "not a JPEG or PNG file"),
    ("truncated", "truncated"),
    ("corrupt", "not a decodable image"),
    ("missing", "not found"),
]


@pytest.mark.parametrize("kind, reason", BAD_INPUTS)
def test_single_bad_file(run_dir, tmp_path, capsys, kind, reason):
    bad = write_bad(tmp_path, kind)
    code, out, err = predict(capsys, "--model", run_dir, bad)

    assert code == EXIT_SOME_FAILED
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert str(bad) in errors[0]
    assert reason in errors[0]
    assert out == ""


def test_bad_inputs_reported_good_ones_predicted(run_dir, images, tmp_path, capsys):
    bad = [write_bad(tmp_path / "bad", kind) for kind, _ in BAD_INPUTS]
    csv_path = tmp_path / "mixed.csv"
    code, out, err = predict(capsys, "--model", run_dir, images / "single.png", *bad, "--csv", csv_path)

    assert code == EXIT_SOME_FAILED
    assert len(out.splitlines()) == 2  # header and the one good image
    assert "single.png" in out
    errors = error_lines(err)
    assert len(errors) == len(bad)
    for path in bad:
        assert any(str(path) in line for line in errors), err
    assert "5 of 6 inputs failed" in err

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["error"] == "" for row in rows] == [True] + [False] * len(bad)
    assert rows[1]["predicted_class"] == ""


def test_folder_without_images(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, _, err = predict(capsys, "--model", run_dir, tmp_path / "empty")
    assert code == EXIT_SOME_FAILED
    errors = error_lines(err)
    assert len(errors) == 1
    assert "contains no .jpg, .jpeg, .png files" in errors[0]


def test_run_folder_without_model(tmp_path, images, capsys):
    runs.write_json(tmp_path / runs.CLASSES_FILE, {"class_names": CLASSES})
    code, out, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_USAGE
    errors = error_lines(err)
    assert len(errors) == 1
    assert "model.keras not found" in errors[0]
    assert str(tmp_path) in errors[0]
    assert out == ""


def test_run_folder_without_classes(run_dir, tmp_path, images, capsys):
    (tmp_path / runs.MODEL_FILE).write_bytes((run_dir / runs.MODEL_FILE).read_bytes())
    code, _, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_USAGE
    assert "classes.json not found" in error_lines(err)[0]


def test_corrupt_model_file(run_dir, tmp_path, images, capsys):
    (tmp_path / runs.MODEL_FILE).write_bytes(b"")
    runs.write_json(tmp_path / runs.CLASSES_FILE, {"class_names": CLASSES})
    code, _, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_USAGE
    errors = error_lines(err)
    assert len(errors) == 1
    assert "cannot load the trained model" in errors[0]


@pytest.mark.parametrize("content", ['{"class_names": ', '["glioma"]', '{"names": ["glioma"]}',
                                     '{"class_names": ["glioma", "glioma", "a", "b"]}'])
def test_malformed_classes_file(run_dir, tmp_path, images, capsys, content):
    (tmp_path / runs.MODEL_FILE).write_bytes((run_dir / runs.MODEL_FILE).read_bytes())
    (tmp_path / runs.CLASSES_FILE).write_text(content)
    code, out, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_USAGE
    errors = error_lines(err)
    assert len(errors) == 1
    assert "classes.json is malformed" in errors[0]
    assert out == ""


@pytest.mark.parametrize("flag, target, fragment", [
    ("--csv", "missing/out.csv", "does not exist"),
    ("--json", ".", "is a folder"),
    ("--gradcam", "file.txt", "is a file"),
])
def test_unwritable_output_fails_before_predicting(tmp_path, images, capsys, flag, target, fragment):
    (tmp_path / "file.txt").write_text("notes")
    # The run folder is missing too: naming the output flag shows it was checked first.
    code, out, err = predict(capsys, "--model", tmp_path / "no-run", images / "single.png",
                             flag, tmp_path / target)
    assert code == EXIT_USAGE
    errors = error_lines(err)
    assert len(errors) == 1
    assert flag in errors[0]
    assert fragment in errors[0]
    assert out == ""


def test_class_count_mismatch(run_dir, tmp_path, images, capsys):
    (tmp_path / runs.MODEL_FILE).write_bytes((run_dir / runs.MODEL_FILE).read_bytes())
    runs.write_json(tmp_path / runs.CLASSES_FILE, {"class_names": ["glioma", "notumor"]})
    code, _, err = predict(capsys, "--model", tmp_path, images / "single.png")
    assert code == EXIT_USAGE
    assert "4 outputs but classes.json names 2 classes" in error_lines(err)[0]


def test_gradcam_png_per_image(run_dir, images, tmp_path, capsys):
    out_dir = tmp_path / "cams"
    code, _, err = predict(capsys, "--model", run_dir, images / "scans", images / "single.png",
                           "--gradcam", out_dir)
    assert code == EXIT_OK, err

    expected = {
        "scans/a_gradcam.png": (64, 64),
        "scans/b_gradcam.png": (80, 50),
        "scans/deeper/c_gradcam.png": (64, 64),
        "single_gradcam.png": (64, 64),
    }
    written = sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*.png"))
    assert written == sorted(expected)
    for name, (height, width) in expected.items():
        assert decode_image(out_dir / name).shape == (height, 2 * width, 3)


def test_cli_one_line_error_and_exit_code(run_dir, tmp_path):
    bad = write_bad(tmp_path, "corrupt")
    result = run_module(["hvdmri.predict", "--model", str(run_dir), str(bad)], timeout=300)
    assert result.returncode == EXIT_SOME_FAILED
    errors = error_lines(result.stderr)
    assert errors == [f"hvdmri.predict: error: {bad}: not a decodable image "
                      f"(corrupt, truncated or not JPEG/PNG)"]
    assert "Traceback" not in result.stderr


def test_help_shows_example():
    result = run_module(["hvdmri.predict", "--help"], timeout=120)
    assert result.returncode == 0
    assert "python -m hvdmri.predict --model runs/" in result.stdout
    assert "exit codes:" in result.stdout


def test_missing_model_flag_is_usage_error():
    result = run_module(["hvdmri.predict", "scan.png"], timeout=120)
    assert result.returncode == EXIT_USAGE
    assert len(error_lines(result.stderr)) == 1
    assert "--model" in result.stderr
