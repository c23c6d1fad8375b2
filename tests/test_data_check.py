"""Duplicate detection, leak-free evaluation sets, the data check and synth commands."""

import hashlib
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_module
from hvdmri.data.check import check_folders
from hvdmri.data.duplicates import (NEAR_MAX_HAMMING, NEAR_MIN_CORRELATION, find_leaks, fingerprint_file,
                                    hamming_distance, leak_free_test_paths, screen_training_images)
from hvdmri.data.listing import CLASS_NAMES, list_images
from hvdmri.data.synth import ensure_phantom_set, write_phantoms


def digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(str(p.relative_to(folder)).encode() + p.read_bytes() for p in files)).hexdigest()


def copy_with(source: Path, target: Path, change=None, quality: int = 90) -> Path:
    """Write source to target, optionally changed by change(image) and re-encoded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if change is None:
        target.write_bytes(source.read_bytes())
        return target
    image = change(cv2.imread(str(source), cv2.IMREAD_UNCHANGED))
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if target.suffix == ".jpg" else []
    assert cv2.imwrite(str(target), image, params)
    return target


def resize_by(factor: float):
    return lambda image: cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)


def lower_contrast(image):
    return (image.astype(np.float32) * 0.7 + 30).astype(np.uint8)


@pytest.fixture
def leaky_folders(tmp_path):
    """A training folder and a test folder with four kinds of copies in it.

    Returns (train, test, {test path: kind}) where kind is exact, quality, resized
    or contrast for copies of training images, and None for unrelated images.
    """
    train = write_phantoms(tmp_path / "Training", per_class=4, image_size=160, seed=1)
    test = write_phantoms(tmp_path / "Testing", per_class=1, image_size=160, seed=99, prefix="Te")
    copies = {
        "glioma/exact.jpg": ("glioma/ph-gl_0000.jpg", None, 90),
        "meningioma/quality.jpg": ("meningioma/ph-me_0001.jpg", lambda image: image, 55),
        "notumor/resized.jpg": ("notumor/ph-no_0002.jpg", resize_by(0.93), 90),
        "pituitary/contrast.png": ("pituitary/ph-pi_0003.jpg", lower_contrast, 90),
    }
    kinds = {path: None for path in list_images(test).paths}
    for target, (source, change, quality) in copies.items():
        copy_with(train / source, test / target, change, quality)
        kinds[target] = source
    return train, test, kinds


def test_copies_stay_within_near_limits(leaky_folders):
    train, test, kinds = leaky_folders
    for target, source in kinds.items():
        if source is None:
            continue
        copy, original = fingerprint_file(test / target), fingerprint_file(train / source)
        assert hamming_distance(copy.phash, original.phash) <= NEAR_MAX_HAMMING, target


def test_find_leaks_returns_every_copy(leaky_folders):
    train, test, kinds = leaky_folders
    leaks = find_leaks(test, train)
    assert leaks == {path for path, source in kinds.items() if source is not None}


def test_leak_free_paths_keep_unrelated_images(leaky_folders):
    train, test, kinds = leaky_folders
    kept = leak_free_test_paths(list_images(test, require_all=False), list_images(train))
    assert kept == sorted(path for path, source in kinds.items() if source is None)


def test_unrelated_phantoms_are_not_duplicates(tmp_path):
    first = write_phantoms(tmp_path / "a", per_class=10, image_size=96, seed=1)
    second = write_phantoms(tmp_path / "b", per_class=10, image_size=96, seed=2)
    assert find_leaks(first, second) == set()


def test_check_reports_leaks_by_kind(leaky_folders):
    train, test, kinds = leaky_folders
    report = check_folders(train, test, progress=False)
    assert report["problems"] == []
    exact = report["exact_duplicates"]
    assert (exact["groups"], exact["across"], exact["within_train"], exact["within_test"]) == (1, 1, 0, 0)
    assert exact["members"][0] == [
        {"split": "train", "path": "glioma/ph-gl_0000.jpg", "class": "glioma"},
        {"split": "test", "path": "glioma/exact.jpg", "class": "glioma"},
    ]
    near_pairs = {(pair["test"], pair["train"]) for pair in report["near_duplicates"]["pairs_across"]}
    assert near_pairs == {(path, source) for path, source in kinds.items()
                          if source is not None and path != "glioma/exact.jpg"}
    for pair in report["near_duplicates"]["pairs_across"]:
        assert pair["hamming"] <= NEAR_MAX_HAMMING
        assert pair["correlation"] >= NEAR_MIN_CORRELATION
    leaks = report["leaked_test_images"]
    assert (leaks["exact"], leaks["near_only"], leaks["total"]) == (1, 3, 4)
    assert report["label_conflicts"] == []


def test_check_reports_label_conflicts(tmp_path):
    train = write_phantoms(tmp_path / "Training", per_class=3, image_size=128, seed=4)
    copy_with(train / "glioma/ph-gl_0000.jpg", train / "meningioma/moved.jpg")
    copy_with(train / "pituitary/ph-pi_0001.jpg", train / "notumor/moved.jpg", resize_by(0.95))
    report = check_folders(train, progress=False)
    conflicts = {conflict["match"]: conflict["members"] for conflict in report["label_conflicts"]}
    assert sorted(conflicts) == ["exact", "near"]
    assert {(m["path"], m["class"]) for m in conflicts["exact"]} == {
        ("glioma/ph-gl_0000.jpg", "glioma"), ("meningioma/moved.jpg", "meningioma")}
    assert {(m["path"], m["class"]) for m in conflicts["near"]} == {
        ("pituitary/ph-pi_0001.jpg", "pituitary"), ("notumor/moved.jpg", "notumor")}
    assert report["exact_duplicates"]["within_train"] == 1
    assert report["near_duplicates"]["pairs_within_train"] == 1
    assert report["near_duplicates"]["groups_within_train"] == 2
    assert report["problems"] == []


def test_screening_excludes_test_duplicates(leaky_folders):
    train, test, kinds = leaky_folders
    screened = screen_training_images(list_images(train), exclude_duplicates_of=test)
    expected = sorted((source, path) for path, source in kinds.items() if source is not None)
    assert sorted(screened.excluded) == expected
    assert not {source for source, _ in expected} & set(screened.paths)
    assert len(screened.paths) == 16 - 4
    assert screened.skipped == []


def test_prepare_run_keeps_groups_on_one_side(tmp_path):
    from hvdmri.config import TrainConfig
    from hvdmri.train import prepare_run

    train = write_phantoms(tmp_path / "Training", per_class=10, image_size=96, seed=5)
    # Three copies of one image per class form groups of 3 or 4.
    for name in CLASS_NAMES:
        source = next(iter(sorted((train / name).iterdir())))
        for k in range(3):
            copy_with(source, train / name / f"copy{k}.jpg")
    copy_with(train / "glioma" / "ph-gl_0005.jpg", train / "glioma" / "resized.jpg", resize_by(0.95))
    config = TrainConfig(data=str(train), run_dir=str(tmp_path / "run"), val_fraction=0.3, seed=3)
    plan = prepare_run(config, world_size=1)

    assert plan["duplicate_groups"] == 5
    sha = [hashlib.sha256((train / path).read_bytes()).hexdigest() for path in plan["paths"]]
    train_digests = {sha[i] for i in plan["train_idx"]}
    val_digests = {sha[i] for i in plan["val_idx"]}
    assert not train_digests & val_digests
    positions = {path: i for i, path in enumerate(plan["paths"])}
    near_pair = {positions["glioma/ph-gl_0005.jpg"], positions["glioma/resized.jpg"]}
    assert near_pair <= set(plan["train_idx"]) or near_pair <= set(plan["val_idx"])
    assert len(plan["train_idx"]) + len(plan["val_idx"]) == 4 * 13 + 1


def test_check_cli_fails_on_missing_folder(tmp_path):
    result = run_module(["hvdmri.data", "check", str(tmp_path / "absent"), "--no-progress"], timeout=120)
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert f"data folder not found: {tmp_path / 'absent'}" in result.stdout


def test_check_cli_fails_on_missing_test_folder(phantom_dir, tmp_path):
    result = run_module(["hvdmri.data", "check", str(phantom_dir), str(tmp_path / "nowhere"), "--no-progress"],
                        timeout=120)
    assert result.returncode == 1
    assert "test folder: data folder not found" in result.stdout


def test_check_cli_rejects_unknown_option(phantom_dir):
    result = run_module(["hvdmri.data", "check", str(phantom_dir), "--no-such-option"], timeout=120)
    assert result.returncode == 2
    assert "--no-such-option" in result.stderr


def test_synth_is_deterministic(tmp_path):
    args = ["--per-class", "2", "--test-per-class", "1", "--image-size", "48", "--seed", "7"]
    first = run_module(["hvdmri.data", "synth", str(tmp_path / "a"), *args], timeout=120)
    second = run_module(["hvdmri.data", "synth", str(tmp_path / "b"), *args], timeout=120)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "wrote 8 training and 4 test phantoms" in first.stdout
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert list_images(tmp_path / "a" / "Training").counts() == {name: 2 for name in CLASS_NAMES}
    assert list_images(tmp_path / "a" / "Testing").counts() == {name: 1 for name in CLASS_NAMES}


def test_synth_matches_cached_phantom_set(tmp_path):
    result = run_module(["hvdmri.data", "synth", str(tmp_path / "cli"), "--per-class", "2",
                         "--test-per-class", "1", "--image-size", "48", "--seed", "7"], timeout=120)
    assert result.returncode == 0, result.stderr
    cached = ensure_phantom_set(tmp_path / "cache", per_class=2, test_per_class=1, image_size=48, seed=7)
    assert digest(tmp_path / "cli") == digest(cached)


def test_synth_rejects_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = run_module(["hvdmri.data", "synth", str(tmp_path / "out"), "--per-class", "1"], timeout=120)
    assert result.returncode == 2
    assert "exists and is not an empty folder" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


@pytest.mark.realdata
def test_check_on_real_data(real_data):
    train, test = real_data / "Training", real_data / "Testing-sample"
    report = check_folders(train, test, progress=False)
    assert report["problems"] == []
    assert report["seconds"] < 60
    assert report["splits"]["train"]["images"] == 5708
    assert report["splits"]["test"]["images"] == 200

    # The exact groups, found again here by hashing every file.
    groups = defaultdict(set)
    for split, folder in (("train", train), ("test", test)):
        listing = list_images(folder, require_all=False)
        for path in listing.paths:
            groups[hashlib.sha256((folder / path).read_bytes()).hexdigest()].add((split, path))
    multi = [members for members in groups.values() if len(members) > 1]
    across = [members for members in multi if len({split for split, _ in members}) == 2]
    exact = report["exact_duplicates"]
    assert exact["groups"] == len(multi)
    assert exact["across"] == len(across)
    assert exact["files"] == sum(len(members) for members in multi)
    reported = {frozenset((m["split"], m["path"]) for m in members) for members in exact["members"]}
    assert reported == {frozenset(members) for members in multi}
    # The full dataset has 300 groups, 189 of them across Training and Testing, and
    # none spanning two classes. This 200-image test sample contains part of them.
    assert 0 < exact["across"] <= 189
    assert exact["groups"] <= 300
    assert report["label_conflicts"] == []
    assert report["leaked_test_images"]["exact"] >= exact["across"]
    assert report["leaked_test_images"]["total"] >= report["leaked_test_images"]["exact"]
