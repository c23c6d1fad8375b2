"""Bad and odd input files: listing, the data check, the input pipeline and training.

One folder contains every case at once (make_bad_tree), so the tests also check
that the counts add up: each file the test writes is either used, skipped with
a reason, or ignored.
"""

import json
import logging
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import horovodrun, rank_lines, run_module, write_image
from hvdmri.data.check import check_folders, stored_mode
from hvdmri.data.decode import load_image, preprocess
from hvdmri.data.listing import list_images
from hvdmri.data.synth import write_phantoms

FAST_TRAIN = ["--weights", "none", "--image-size", "32", "--scratch-epochs", "1", "--batch-size", "4"]
# A JPEG header and end marker with nothing decodable between them: it passes
# the listing's checks and fails only when decoded.
GARBLED_JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 100 + b"\xff\xd9"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(indices: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    """Encode an 8-bit palette PNG by hand (colour type 3), so no imaging library is needed."""
    height, width = indices.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    rows = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"PLTE", bytes(channel for colour in palette for channel in colour))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def pattern(size: int, seed: int) -> np.ndarray:
    """A smooth grayscale image, different for each seed."""
    noise = np.random.default_rng(seed).normal(0, 1, (size, size)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(1.0, size / 12))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min() + 1e-9)
    return (smooth * 255).astype(np.uint8)


def make_bad_tree(root: Path) -> dict:
    """Write 8 good phantoms per class plus one file for each bad or odd case.

    Returns what the test expects of each file, by path relative to root:
    usable (list), skipped_listing and skipped_decode ({path: reason fragment}),
    ignored ({path: reason fragment}), warnings ({path: fragment}) and modes ({path: mode}).
    """
    write_phantoms(root, per_class=8, image_size=48, seed=11)
    expected = {"usable": [str(p.relative_to(root)) for p in sorted(root.rglob("*.jpg"))],
                "skipped_listing": {}, "skipped_decode": {}, "ignored": {}, "warnings": {}, "modes": {}}

    def usable(relative: str, mode: str | None = None, warning: str | None = None) -> Path:
        expected["usable"].append(relative)
        if mode:
            expected["modes"][relative] = mode
        if warning:
            expected["warnings"][relative] = warning
        return root / relative

    def raw(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # Usable, in odd forms.
    deep = pattern(40, 1).astype(np.uint16) * 200  # 16-bit values up to 51,000
    write_image(usable("glioma/deep16.png", "PNG grayscale 16-bit"), deep)
    rgba = np.dstack([pattern(40, 2)] * 3 + [np.full((40, 40), 128, np.uint8)])
    write_image(usable("meningioma/alpha.png", "PNG RGBA 8-bit"), rgba)
    shades = [(0, 0, 0), (80, 80, 80), (160, 160, 160), (250, 250, 250)]
    raw(usable("notumor/palette.png", "PNG palette 8-bit"), palette_png(pattern(40, 3) // 64, shades))
    write_image(usable("pituitary/dot.png", warning="only 1x1 px"), np.full((1, 1), 200, np.uint8))
    gradient = np.tile(np.linspace(0, 255, 6000, dtype=np.float32), (6000, 1)).astype(np.uint8)
    raw(usable("glioma/huge.jpg", "JPEG grayscale 8-bit"), jpeg_bytes(gradient, 50))
    write_image(usable("meningioma/UPPER.JPG", "JPEG grayscale 8-bit"), pattern(40, 4))
    png = cv2.imencode(".png", pattern(40, 5))[1].tobytes()
    raw(usable("notumor/png_inside.jpg", "PNG grayscale 8-bit", warning="PNG content in a .jpg file"), png)

    # Skipped at listing time, by size or header.
    good_jpeg = jpeg_bytes(pattern(64, 6))
    bad_listing = {
        "glioma/empty.jpg": (b"", "empty file"),
        "glioma/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated JPEG"),
        "meningioma/notes.jpg": (b"these are notes, not an image\n", "not a JPEG or PNG"),
        # A subfolder of a class holding only bad files.
        "pituitary/batch2/zero.jpg": (b"", "empty file"),
        "pituitary/batch2/text.png": (b"plain text", "not a JPEG or PNG"),
    }
    for relative, (data, reason) in bad_listing.items():
        raw(root / relative, data)
        expected["skipped_listing"][relative] = reason
    (root / "notumor" / "loop.jpg").symlink_to("loop.jpg")
    expected["skipped_listing"]["notumor/loop.jpg"] = "symbolic links"

    # Right header and end marker, but nothing decodable between them.
    raw(root / "glioma/garbled.jpg", GARBLED_JPEG)
    expected["skipped_decode"]["glioma/garbled.jpg"] = "not a decodable image"

    # Never read.
    raw(root / "glioma/.DS_Store", b"\0\0\0\1Bud1")
    raw(root / "meningioma/Thumbs.db", b"\xd0\xcf\x11\xe0")
    raw(root / "notumor/._scan.jpg", b"\x00\x05\x16\x07")
    write_image(root / "pituitary" / ".cache" / "inside.jpg", pattern(40, 7))
    raw(root / "pituitary/readme.txt", b"about these scans")
    (root / "glioma" / "loop").symlink_to(root / "glioma", target_is_directory=True)
    expected["ignored"] = {
        "glioma/.DS_Store": "hidden or system file",
        "meningioma/Thumbs.db": "hidden or system file",
        "notumor/._scan.jpg": "hidden or system file",
        "pituitary/.cache/": "hidden or system folder",
        "pituitary/readme.txt": "not an image extension",
        "glioma/loop/": "symbolic link to a folder",
    }
    return expected


@pytest.fixture
def bad_tree(tmp_path):
    root = tmp_path / "Training"
    return root, make_bad_tree(root)


def test_listing_sorts_every_case(bad_tree):
    root, expected = bad_tree
    listing = list_images(root)
    skipped = dict(listing.skipped)
    ignored = dict(listing.ignored)
    assert sorted(listing.paths) == sorted(expected["usable"] + list(expected["skipped_decode"]))
    assert sorted(skipped) == sorted(expected["skipped_listing"])
    for relative, fragment in expected["skipped_listing"].items():
        assert fragment in skipped[relative], (relative, skipped[relative])
    assert sorted(ignored) == sorted(expected["ignored"])
    for relative, fragment in expected["ignored"].items():
        assert fragment in ignored[relative], (relative, ignored[relative])


def test_check_names_every_bad_file(bad_tree):
    root, expected = bad_tree
    report = check_folders(root, progress=False)
    assert report["problems"] == []

    skipped = {item["path"]: item for item in report["skipped"]}
    for relative, fragment in expected["skipped_listing"].items():
        assert skipped[relative]["stage"] == "listing"
        assert fragment in skipped[relative]["reason"]
    for relative, fragment in expected["skipped_decode"].items():
        assert skipped[relative]["stage"] == "decode"
        assert fragment in skipped[relative]["reason"]
    assert len(skipped) == len(expected["skipped_listing"]) + len(expected["skipped_decode"])

    ignored = {item["path"] for item in report["ignored"]}
    assert ignored == set(expected["ignored"])
    warnings = {item["path"]: item["warning"] for item in report["warnings"]}
    for relative, fragment in expected["warnings"].items():
        assert fragment in warnings[relative]

    train = report["splits"]["train"]
    assert train["images"] == len(expected["usable"])
    assert sum(train["per_class"].values()) == train["images"]
    for mode in expected["modes"].values():
        assert mode in train["modes"], train["modes"]
    assert "6000x6000" in train["sizes"]
    assert "1x1" in train["sizes"]


def test_counts_add_up(bad_tree):
    root, expected = bad_tree
    report = check_folders(root, progress=False)
    # Every entry the walk meets counts once: a file or file link, a hidden folder
    # (whose content is never read) or a link to a folder. Class folders do not count.
    entries = 0
    for path in root.rglob("*"):
        inside_hidden = any(part.startswith(".") for part in path.relative_to(root).parts[:-1])
        plain_folder = path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
        if not inside_hidden and not plain_folder:
            entries += 1
    counted = report["splits"]["train"]["images"] + len(report["skipped"]) + len(report["ignored"])
    assert counted == entries


@pytest.mark.parametrize("name, data, mode", [
    ("gray.jpg", jpeg_bytes(pattern(16, 8)), "JPEG grayscale 8-bit"),
    ("colour.jpg", jpeg_bytes(np.dstack([pattern(16, 9)] * 3)), "JPEG RGB 8-bit"),
    ("rgb.png", cv2.imencode(".png", np.dstack([pattern(16, 9)] * 3))[1].tobytes(), "PNG RGB 8-bit"),
    ("text.jpg", b"hello", "unknown format"),
])
def test_stored_mode_reads_headers(tmp_path, name, data, mode):
    path = tmp_path / name
    path.write_bytes(data)
    assert stored_mode(path) == mode


def test_check_cli_writes_json(bad_tree, tmp_path):
    root, expected = bad_tree
    report_path = tmp_path / "report.json"
    result = run_module(["hvdmri.data", "check", str(root), "--json", str(report_path), "--no-progress"],
                        timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert len(report["skipped"]) == len(expected["skipped_listing"]) + len(expected["skipped_decode"])
    for relative in [*expected["skipped_listing"], *expected["skipped_decode"]]:
        assert relative in result.stdout
    assert "OK: nothing here stops training" in result.stdout


def test_class_with_only_bad_files_stops_training(tmp_path):
    root = write_phantoms(tmp_path / "Training", per_class=6, image_size=48, seed=2)
    for image in (root / "pituitary").iterdir():
        image.unlink()
    (root / "pituitary" / "empty.jpg").write_bytes(b"")
    (root / "pituitary" / "notes.jpg").write_text("not an image")

    check = run_module(["hvdmri.data", "check", str(root), "--no-progress"], timeout=300)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "FAILED" in check.stdout
    assert "pituitary" in check.stdout.split("FAILED", 1)[1]
    assert "pituitary/empty.jpg" in check.stdout
    assert "pituitary/notes.jpg" in check.stdout

    train = run_module(["hvdmri.train", "--data", str(root), *FAST_TRAIN, "--run-dir", str(tmp_path / "run")],
                       timeout=300)
    assert train.returncode == 2, train.stdout + train.stderr
    errors = [line for line in train.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, train.stderr
    assert "no usable images in class folder(s) pituitary" in errors[0]
    assert "2 image files skipped there" in errors[0]
    assert "Traceback" not in train.stderr


def test_training_pipeline_matches_predict(bad_tree):
    from hvdmri.data.pipeline import make_dataset

    root, expected = bad_tree
    odd = sorted(set(expected["modes"]) | set(expected["warnings"]))
    paths = [str(root / relative) for relative in odd]
    dataset = make_dataset(paths, [0] * len(paths), 32, len(paths), training=True, augment=False,
                           with_index=True)
    direct = [preprocess(load_image(path, 32)) for path in paths]
    seen = set()
    # Training decodes out of order, so a slow file (the 6000 px one) may arrive
    # in the next epoch's batch: look at two batches.
    for images, labels, weights, index in dataset.take(2):
        assert weights.numpy().tolist() == [1.0] * len(paths)
        for row, position in enumerate(index.numpy()):
            np.testing.assert_allclose(images.numpy()[row], direct[position], atol=1e-4, err_msg=paths[position])
            seen.add(int(position))
    assert seen == set(range(len(paths)))


def test_pipeline_skips_and_counts_bad_files(tmp_path):
    from hvdmri.data.pipeline import DecodeFailures, make_dataset

    good = [str(write_image(tmp_path / f"good{i}.png", pattern(16, i))) for i in range(3)]
    bad = tmp_path / "garbled.jpg"
    bad.write_bytes(GARBLED_JPEG)
    failures = DecodeFailures()
    dataset = make_dataset(good + [str(bad)], [0, 1, 2, 3], 16, 3, training=True, augment=False,
                           with_index=True, failures=failures)
    batches = list(dataset.take(4))
    for _, labels, weights, index in batches:
        assert 3 not in index.numpy().tolist()
        assert weights.numpy().tolist() == [1.0, 1.0, 1.0]
    assert failures.take_count() >= 1
    assert list(failures.reasons()) == [str(bad)]
    assert "not a decodable image" in failures.reasons()[str(bad)]
    assert failures.blank_shard_size == 0


def test_all_bad_shard_still_yields_batches(tmp_path):
    from hvdmri.data.pipeline import DecodeFailures, make_dataset

    paths = []
    for i in range(3):
        path = tmp_path / f"bad{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes([i]) * 50 + b"\xff\xd9")
        paths.append(str(path))
    failures = DecodeFailures()
    dataset = make_dataset(paths, [0, 1, 2], 16, 2, training=True, augment=False, failures=failures)
    started = time.time()
    batches = list(dataset.take(3))
    assert time.time() - started < 60
    assert len(batches) == 3
    for images, labels, weights in batches:
        assert images.shape == (2, 16, 16, 3)
        assert weights.numpy().tolist() == [0.0, 0.0]
    assert failures.blank_shard_size == 3
    assert len(failures.reasons()) == 3


def test_validation_pipeline_drops_bad_files(tmp_path):
    from hvdmri.data.pipeline import DecodeFailures, make_dataset

    good = str(write_image(tmp_path / "good.png", pattern(16, 1)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(GARBLED_JPEG)
    failures = DecodeFailures()
    batches = list(make_dataset([str(bad), good, str(bad)], [0, 1, 2], 16, 4, training=False,
                                with_index=True, failures=failures))
    assert len(batches) == 1
    images, labels, index = batches[0]
    assert index.numpy().tolist() == [1]
    assert labels.numpy().tolist() == [1]
    assert failures.take_count() == 2


def test_failure_count_resets_when_taken():
    from hvdmri.data.pipeline import DecodeFailures

    failures = DecodeFailures()
    failures.record("a.jpg", "a.jpg: not a decodable image")
    failures.record("a.jpg", "a.jpg: not a decodable image")
    assert failures.take_count() == 2
    assert failures.take_count() == 0
    assert failures.reasons() == {"a.jpg": "a.jpg: not a decodable image"}


def test_failure_report_logs_each_file_once(caplog, monkeypatch):
    from hvdmri.data.pipeline import DecodeFailureReport, DecodeFailures

    failures = DecodeFailures()
    failures.record("/data/glioma/a.jpg", "/data/glioma/a.jpg: not a decodable image")
    report = DecodeFailureReport(failures)
    # setup_logging() turns propagation off; caplog listens on the root logger.
    monkeypatch.setattr(logging.getLogger("hvdmri"), "propagate", True)
    logs = {}
    with caplog.at_level(logging.WARNING, logger="hvdmri"):
        report.on_epoch_end(0, logs)
        failures.record("/data/glioma/a.jpg", "/data/glioma/a.jpg: not a decodable image")
        report.on_epoch_end(1, {})
        report.on_epoch_end(2, {})
    messages = [record.getMessage() for record in caplog.records]
    assert logs["decode_failures"] == 1
    assert messages[0] == "epoch 1: 1 images could not be decoded and were left out (1 distinct files so far)"
    assert messages[1] == "  /data/glioma/a.jpg: not a decodable image"
    assert messages[2].startswith("epoch 2: 1 images")
    assert len(messages) == 3  # the file is named once; epoch 3 had no failure


WORKER = """
import json, sys
import horovod.tensorflow.keras as hvd
import tensorflow as tf
from hvdmri.data.pipeline import DecodeFailureReport, DecodeFailures, make_dataset
from hvdmri.distributed import setup_logging

hvd.init()
setup_logging(hvd.rank())
good, bad = json.loads(sys.argv[1]), json.loads(sys.argv[2])
paths = good if hvd.rank() == 0 else bad
failures = DecodeFailures()
dataset = make_dataset(paths, [0] * len(paths), 32, 2, training=True, seed=hvd.rank(), failures=failures)
model = tf.keras.Sequential([tf.keras.Input((32, 32, 3)), tf.keras.layers.GlobalAveragePooling2D(),
                             tf.keras.layers.Dense(4, activation="softmax")])
model.compile(hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01)), "sparse_categorical_crossentropy")
counts = []
capture = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: counts.append(logs["decode_failures"]))
model.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0,
          callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), DecodeFailureReport(failures), capture])
print("RESULT " + json.dumps({"rank": hvd.rank(), "counts": counts}), flush=True)
"""


@pytest.mark.slow
def test_rank_with_all_bad_files_does_not_hang(tmp_path):
    good = [str(write_image(tmp_path / f"good{i}.png", pattern(32, i))) for i in range(4)]
    bad = []
    for i in range(3):
        path = tmp_path / f"bad{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes([i]) * 50 + b"\xff\xd9")
        bad.append(str(path))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = horovodrun(2, [str(script), json.dumps(good), json.dumps(bad)], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    results = {}
    for line in run.stdout.splitlines():
        if "RESULT " in line:
            data = json.loads(line.split("RESULT ", 1)[1])
            results[data["rank"]] = data
    assert sorted(results) == [0, 1]
    # Both ranks see the same totals: rank 1 fails on every image it decodes.
    assert results[0]["counts"] == results[1]["counts"]
    assert all(count > 0 for count in results[0]["counts"])
    rank0 = "\n".join(rank_lines(run.stdout, 0))
    assert "rank 1: none of the 3 training images in its shard can be decoded" in rank0
    for path in bad:
        assert path in rank0


@pytest.mark.slow
def test_training_runs_on_the_good_images(bad_tree, tmp_path):
    root, expected = bad_tree
    # A test folder holding a byte-identical copy of one training image.
    test_dir = tmp_path / "Testing"
    copied = expected["usable"][0]
    (test_dir / Path(copied).parent).mkdir(parents=True)
    (test_dir / copied).write_bytes((root / copied).read_bytes())
    run_dir = tmp_path / "run"

    result = run_module(["hvdmri.train", "--data", str(root), *FAST_TRAIN, "--run-dir", str(run_dir),
                         "--exclude-duplicates-of", str(test_dir)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epoch 1/1" in result.stdout

    config = json.loads((run_dir / "config.json").read_text())
    skipped = dict(config["skipped_files"])
    for relative, fragment in [*expected["skipped_listing"].items(), *expected["skipped_decode"].items()]:
        assert fragment in skipped[relative]
        assert f"skipped {relative}" in result.stdout
    assert len(skipped) == len(expected["skipped_listing"]) + len(expected["skipped_decode"])
    assert config["exclude_duplicates_of"] == str(test_dir)
    assert config["excluded_duplicates"] == [[copied, copied]]
    assert "left out 1 training images that duplicate a test image" in result.stdout
    # Every usable image is trained on, validated on, or excluded as a test duplicate.
    assert config["train_images"] + config["val_images"] + 1 == len(expected["usable"])
    assert (run_dir / "model.keras").is_file()
