"""Listing of an image folder laid out as DIR/<class>/<image>.

The listing is the only place that decides which files are images: training,
evaluation and the dataset check all start from it, so they agree on what counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# The Kaggle "Brain Tumor MRI Dataset" folder names, in the order the model's
# outputs use. The order is saved with every run, so a later evaluation or
# prediction never depends on how a folder happens to sort.
CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Files that file managers leave in class folders; skipped without a report.
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}

# Leading bytes of the formats we read. A file whose header matches neither is
# skipped at listing time, before any rank spends time decoding it.
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Listing:
    """Images found under a root folder, with their labels and the files skipped.

    Attributes:
        root: the folder that was listed.
        class_names: class folder names; a label is an index into this tuple.
        paths: image paths relative to root, sorted, so every rank sees the same order.
        labels: one label per path.
        skipped: (relative path, reason) for every file that looked like an image but is not usable.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Return the number of images per class name."""
        counts = {name: 0 for name in self.class_names}
        for label in self.labels:
            counts[self.class_names[label]] += 1
        return counts

    def absolute(self, relative: str) -> str:
        return str(self.root / relative)


def is_ignored(name: str) -> bool:
    """True for hidden files and folders, macOS ._ companions and OS clutter."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def sniff_image(path: Path) -> str | None:
    """Return why the file cannot be an image we read, or None when it looks fine."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC):
        return None
    return "not a JPEG or PNG file (unknown header)"


def list_images(root: str | os.PathLike, class_names: tuple[str, ...] | None = None,
                require_all: bool = True) -> Listing:
    """List DIR/<class>/*.{jpg,jpeg,png} (extensions in any case).

    Args:
        root: the data folder.
        class_names: the expected classes, in label order. Defaults to CLASS_NAMES.
        require_all: raise when a class folder is missing or holds no usable image.
            Evaluation folders may legitimately lack a class, so they pass False.

    Raises:
        ValueError: the folder is missing, holds folders of unknown classes, or
            (with require_all) lacks a class or any usable image for it.
    """
    root = Path(root)
    class_names = tuple(class_names or CLASS_NAMES)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")

    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not is_ignored(entry.name))
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise ValueError(
            f"{root} holds class folders the model does not know: {', '.join(unknown)} "
            f"(expected {', '.join(class_names)})"
        )
    missing = [name for name in class_names if name not in found]
    if require_all and missing:
        raise ValueError(f"class folder missing in {root}: {', '.join(missing)} "
                         f"(expected one subfolder per class: {', '.join(class_names)})")

    listing = Listing(root=root, class_names=class_names)
    for label, name in enumerate(class_names):
        if name not in found:
            continue
        for relative in _walk_class_folder(root, name):
            if not relative.lower().endswith(IMAGE_EXTENSIONS):
                continue
            reason = sniff_image(root / relative)
            if reason:
                listing.skipped.append((relative, reason))
                continue
            listing.paths.append(relative)
            listing.labels.append(label)

    if len(listing) == 0:
        raise ValueError(f"no usable images (.jpg, .jpeg, .png) found under {root}")
    if require_all:
        empty = [name for name, count in listing.counts().items() if count == 0]
        if empty:
            raise ValueError(f"no usable images in class folder(s) {', '.join(empty)} under {root}")
    return listing


def _walk_class_folder(root: Path, class_name: str) -> list[str]:
    """Return sorted relative paths of the visible files below one class folder."""
    relatives = []
    # followlinks=False: a symlink loop inside a class folder cannot trap the walk.
    for folder, subfolders, files in os.walk(root / class_name, followlinks=False):
        subfolders[:] = [name for name in subfolders if not is_ignored(name)]
        for name in files:
            if not is_ignored(name):
                relatives.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(relatives)
