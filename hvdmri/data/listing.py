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
# Files that file managers leave in class folders: never read, only named in Listing.ignored.
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}

# Leading bytes of the formats we read. A file whose header matches neither is
# skipped at listing time, before any rank spends time decoding it.
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# End markers: JPEG's end-of-image marker and PNG's IEND chunk type. libjpeg (as
# OpenCV 4.10 uses it) decodes a truncated JPEG without an error and fills the
# missing rows with gray, so truncation is caught here instead. Encoders may
# append bytes after the marker, hence a search of the tail, not of the last bytes.
# NOTE: a file with more than _TAIL_BYTES after its end marker is skipped as truncated.
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"
_TAIL_BYTES = 1024


@dataclass
class Listing:
    """Images found under a root folder, with their labels and the files skipped.

    Attributes:
        root: the folder that was listed.
        class_names: class folder names; a label is an index into this tuple.
        paths: image paths relative to root, sorted, so every rank sees the same order.
        labels: one label per path.
        skipped: (relative path, reason) for every file that looked like an image but is not usable.
        ignored: (relative path, reason) for hidden and system files, files without an
            image extension and symbolic links to folders, which are never read.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

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
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if head.startswith(_JPEG_MAGIC):
        return None if _JPEG_END in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG_MAGIC):
        return None if _PNG_END in tail else "truncated PNG (no IEND chunk)"
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
        relatives, ignored = _walk_class_folder(root, name)
        listing.ignored.extend(ignored)
        for relative in relatives:
            if not relative.lower().endswith(IMAGE_EXTENSIONS):
                listing.ignored.append((relative, "not an image extension (.jpg, .jpeg, .png)"))
                continue
            reason = sniff_image(root / relative)
            if reason:
                listing.skipped.append((relative, reason))
                continue
            listing.paths.append(relative)
            listing.labels.append(label)

    if len(listing) == 0:
        if any(entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in root.iterdir()):
            # A class folder given by mistake: its images sit at the top, with no class subfolders.
            raise ValueError(f"{root} contains images but no class subfolders; give the folder above it, "
                             f"which has one subfolder per class ({', '.join(class_names)})")
        raise ValueError(f"no usable images (.jpg, .jpeg, .png) found under {root}")
    if require_all:
        empty = [name for name, count in listing.counts().items() if count == 0]
        if empty:
            skipped = sum(1 for relative, _ in listing.skipped if Path(relative).parts[0] in empty)
            raise ValueError(f"no usable images in class folder(s) {', '.join(empty)} under {root} "
                             f"({skipped} image files skipped there; "
                             f"`python -m hvdmri.data check {root}` names them and the reasons)")
    return listing


def _walk_class_folder(root: Path, class_name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Return the sorted relative paths of the visible files below one class folder,
    and (relative path, reason) for the entries the walk leaves out."""
    relatives, ignored = [], []
    # followlinks=False: a symlink loop inside a class folder cannot trap the walk.
    for folder, subfolders, files in os.walk(root / class_name, followlinks=False):
        visible = []
        for name in subfolders:
            relative = os.path.relpath(os.path.join(folder, name), root)
            if is_ignored(name):
                ignored.append((relative + "/", "hidden or system folder"))
            elif os.path.islink(os.path.join(folder, name)):
                ignored.append((relative + "/", "symbolic link to a folder (not followed)"))
            else:
                visible.append(name)
        subfolders[:] = visible
        for name in files:
            relative = os.path.relpath(os.path.join(folder, name), root)
            if is_ignored(name):
                ignored.append((relative, "hidden or system file"))
            else:
                relatives.append(relative)
    return sorted(relatives), sorted(ignored)
