"""Listing image folders: layout, ignored files, bad folders."""

import numpy as np
import pytest

from conftest import write_image
from hvdmri.data.listing import CLASS_NAMES, list_images

GRAY = np.full((16, 16), 128, np.uint8)


def make_layout(root, per_class=2, classes=CLASS_NAMES):
    for name in classes:
        for i in range(per_class):
            write_image(root / name / f"img{i}.jpg", GRAY)
    return root


def test_lists_all_classes_in_fixed_order(tmp_path):
    listing = list_images(make_layout(tmp_path))
    assert listing.class_names == CLASS_NAMES
    assert listing.counts() == {name: 2 for name in CLASS_NAMES}
    assert listing.paths == sorted(listing.paths)
    assert listing.labels == [0, 0, 1, 1, 2, 2, 3, 3]


def test_extensions_are_case_insensitive(tmp_path):
    make_layout(tmp_path, per_class=1)
    write_image(tmp_path / "glioma" / "upper.JPG", GRAY)
    write_image(tmp_path / "glioma" / "mixed.Jpeg", GRAY)
    write_image(tmp_path / "glioma" / "scan.PNG", GRAY)
    assert list_images(tmp_path).counts()["glioma"] == 4


def test_hidden_and_clutter_files_are_ignored(tmp_path):
    make_layout(tmp_path, per_class=1)
    write_image(tmp_path / "glioma" / ".ipynb_checkpoints" / "stray.jpg", GRAY)
    write_image(tmp_path / "glioma" / "._img0.jpg", GRAY)
    (tmp_path / "glioma" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "glioma" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / ".hidden_class").mkdir()
    listing = list_images(tmp_path)
    assert listing.counts()["glioma"] == 1
    assert listing.skipped == []


def test_bad_files_are_skipped_with_reason(tmp_path):
    make_layout(tmp_path, per_class=1)
    (tmp_path / "meningioma" / "empty.jpg").write_bytes(b"")
    (tmp_path / "meningioma" / "notes.jpg").write_text("not an image")
    listing = list_images(tmp_path)
    reasons = dict(listing.skipped)
    assert "empty" in reasons["meningioma/empty.jpg"]
    assert "not a JPEG or PNG" in reasons["meningioma/notes.jpg"]
    assert listing.counts()["meningioma"] == 1


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="data folder not found: .*nowhere"):
        list_images(tmp_path / "nowhere")


def test_empty_folder_reports_missing_classes(tmp_path):
    with pytest.raises(ValueError, match="class folder missing"):
        list_images(tmp_path)


def test_missing_class_folder_is_named(tmp_path):
    make_layout(tmp_path, classes=CLASS_NAMES[:3])
    with pytest.raises(ValueError, match="class folder missing .*pituitary"):
        list_images(tmp_path)


def test_class_folders_without_images(tmp_path):
    for name in CLASS_NAMES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no usable images"):
        list_images(tmp_path)


def test_one_empty_class_is_named(tmp_path):
    make_layout(tmp_path, classes=CLASS_NAMES[:3])
    (tmp_path / "pituitary").mkdir()
    with pytest.raises(ValueError, match="no usable images in class folder.*pituitary"):
        list_images(tmp_path)


def test_unknown_class_folder_is_named(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "astrocytoma").mkdir()
    with pytest.raises(ValueError, match="does not know: astrocytoma"):
        list_images(tmp_path)


def test_evaluation_folder_may_lack_a_class(tmp_path):
    make_layout(tmp_path, classes=("glioma", "notumor"))
    listing = list_images(tmp_path, require_all=False)
    assert listing.counts() == {"glioma": 2, "meningioma": 0, "notumor": 2, "pituitary": 0}


def test_symlink_loop_does_not_hang(tmp_path):
    make_layout(tmp_path, per_class=1)
    (tmp_path / "glioma" / "loop").symlink_to(tmp_path / "glioma", target_is_directory=True)
    assert list_images(tmp_path).counts()["glioma"] == 1


def test_class_folder_as_root(tmp_path):
    glioma = tmp_path / "glioma"
    write_image(glioma / "a.png", np.full((32, 32), 90, np.uint8))
    with pytest.raises(ValueError, match="contains images but no class subfolders; give the folder above it"):
        list_images(glioma, require_all=False)
