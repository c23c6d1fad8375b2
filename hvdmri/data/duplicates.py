"""Exact and near-duplicate images: fingerprints, duplicate groups and train/test leaks.

Two images are exact duplicates when their files are byte-identical (same SHA-256).
They are near duplicates when both of these hold:
- their perceptual hashes differ in at most NEAR_MAX_HAMMING of 64 bits. The hash
  is a DCT pHash: the image is reduced to 32x32 grayscale, and each bit is 1 when
  one of the 8x8 lowest-frequency DCT coefficients lies above their median;
- the Pearson correlation of their 64x64 grayscale thumbnails is at least
  NEAR_MIN_CORRELATION.

The hash alone is too coarse for brain MRI, because axial slices share one layout.
On the Kaggle Brain Tumor MRI images (5,908 files: Training and a 200-image Testing
sample), 1,074 pairs of different files had hash distance 0, and a few of them were
different slices. Joining all pairs within distance 6 chained unrelated scans into
groups of over 100 images. In a visual sample of pairs within distance 8, those
with a correlation of 0.98 or more were the same slice re-encoded, rescaled or with
another contrast, and pairs below about 0.95 were neighbouring slices of one scan.
No pair at a distance of 10 to 20 reached a correlation of 0.99. A JPEG re-encoded
at another quality or resized by a few percent stays within both limits
(tests/test_data_check.py).

Every image is decoded by hvdmri.data.decode, so a file this module cannot read
is one that training would skip too.

NOTE: near-duplicate search compares every pair of hashes, so its cost grows with
the square of the image count: 2 s for 5,908 images on a busy 2-core machine, so an
estimated few minutes at 50,000.
NOTE: the thumbnail keeps the pixel noise of images not much larger than 64 px,
so a resized copy of a 64 px image can correlate below 0.98 and go unnoticed.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import cv2
import numpy as np

from hvdmri.data.decode import DecodeError, decode_image
from hvdmri.data.listing import Listing, list_images

NEAR_MAX_HAMMING = 8
NEAR_MIN_CORRELATION = 0.98
HASH_SIZE = 32  # side of the grayscale image the DCT runs on
HASH_BLOCK = 8  # side of the low-frequency DCT block that gives the 64 bits
THUMBNAIL_SIZE = 64
# Hash comparisons per block: 1,024 rows of the distance matrix at a time keep
# the float32 blocks under 30 MB for 6,000 images.
_ROWS_PER_BLOCK = 1024

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ImageFingerprint:
    """The duplicate-detection record of one image.

    Attributes:
        sha256: hex digest of the file's bytes.
        phash: the 64-bit DCT perceptual hash.
        thumbnail: (64, 64) uint8 grayscale copy, for the correlation check.
        height, width: size of the decoded image in pixels.
    """

    sha256: str
    phash: int
    thumbnail: np.ndarray
    height: int
    width: int


@dataclass
class Fingerprints:
    """Fingerprints of several images; row i belongs to paths[i]."""

    paths: list[str]
    sha256: list[str]
    hashes: np.ndarray  # (n,) uint64
    thumbnails: np.ndarray  # (n, 64, 64) uint8

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_images(cls, paths: list[str], images: list[ImageFingerprint]) -> "Fingerprints":
        return cls(
            paths=list(paths),
            sha256=[image.sha256 for image in images],
            hashes=np.array([image.phash for image in images], dtype=np.uint64),
            thumbnails=(np.stack([image.thumbnail for image in images]) if images
                        else np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.uint8)),
        )

    def subset(self, indices: Iterable[int]) -> "Fingerprints":
        indices = list(indices)
        return Fingerprints([self.paths[i] for i in indices], [self.sha256[i] for i in indices],
                            self.hashes[indices], self.thumbnails[indices])


def perceptual_hash(gray: np.ndarray) -> int:
    """Return the 64-bit DCT pHash of a 2-D uint8 image."""
    small = cv2.resize(gray, (HASH_SIZE, HASH_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:HASH_BLOCK, :HASH_BLOCK].flatten()
    # The DC coefficient is the mean brightness, far above the others, so it is
    # left out of the median that the other bits are compared with.
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint_pixels(image: np.ndarray, sha256: str) -> ImageFingerprint:
    """Fingerprint an (H, W, 3) uint8 RGB image whose file has the given digest."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    thumbnail = cv2.resize(gray, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA)
    return ImageFingerprint(sha256, perceptual_hash(gray), thumbnail, image.shape[0], image.shape[1])


def fingerprint_file(path: str | os.PathLike) -> ImageFingerprint:
    """Hash, decode and fingerprint one image file.

    Raises:
        DecodeError: the file cannot be read or decoded; the message names it.
    """
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise DecodeError(f"{path}: cannot read file ({error.strerror or error})") from None
    return fingerprint_pixels(decode_image(path), digest)


def map_in_threads(function: Callable[[T], R], items: list[T], workers: int | None = None,
                   progress: str | None = None) -> list[R]:
    """Return [function(item) for item in items], computed by a pool of threads.

    OpenCV and hashlib release the GIL while they work, so threads use several
    cores without the start-up cost and pickling of a process pool.

    Args:
        workers: threads; default os.cpu_count().
        progress: the label of a tqdm progress bar; None shows no bar.
    """
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(function, items)
        if progress is not None:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=progress, unit="image")
        return list(results)


def fingerprint_listing(listing: Listing, workers: int | None = None,
                        progress: str | None = None) -> tuple[Fingerprints, list[int], list[tuple[str, str]]]:
    """Fingerprint every image of a listing.

    Returns:
        (fingerprints, decoded, failed): fingerprints of the decodable images;
        decoded, their positions in listing.paths; failed, (relative path, reason)
        for each file that cannot be decoded.
    """
    def attempt(relative: str) -> ImageFingerprint | str:
        path = listing.absolute(relative)
        try:
            return fingerprint_file(path)
        except DecodeError as error:
            # The listing names the file already; keep only the reason.
            return str(error).removeprefix(f"{path}: ")

    results = map_in_threads(attempt, listing.paths, workers, progress)
    decoded = [i for i, result in enumerate(results) if isinstance(result, ImageFingerprint)]
    failed = [(listing.paths[i], result) for i, result in enumerate(results) if isinstance(result, str)]
    fingerprints = Fingerprints.from_images([listing.paths[i] for i in decoded], [results[i] for i in decoded])
    return fingerprints, decoded, failed


def _hash_bits(hashes: np.ndarray) -> np.ndarray:
    """Unpack (n,) uint64 hashes into an (n, 64) float32 matrix of 0/1."""
    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).astype(np.float32)


def hamming_distance(hash_a: int, hash_b: int) -> int:
    return bin(int(hash_a) ^ int(hash_b)).count("1")


def _thumbnail_correlation(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Return the Pearson correlation of each pair of rows of two (n, 64, 64) uint8 stacks.

    A flat thumbnail (an image of one colour) has no defined correlation. Two flat
    thumbnails count as 1 when their gray levels differ by 2 or less, and any
    other pair with a flat side counts as 0.
    """
    a = left.reshape(len(left), -1).astype(np.float32)
    b = right.reshape(len(right), -1).astype(np.float32)
    a_centered = a - a.mean(axis=1, keepdims=True)
    b_centered = b - b.mean(axis=1, keepdims=True)
    a_norm = np.linalg.norm(a_centered, axis=1)
    b_norm = np.linalg.norm(b_centered, axis=1)
    flat_a, flat_b = a_norm < 1e-3, b_norm < 1e-3
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = (a_centered * b_centered).sum(axis=1) / (a_norm * b_norm)
    both_flat = flat_a & flat_b
    same_level = np.abs(a.mean(axis=1) - b.mean(axis=1)) <= 2.0
    correlation = np.where(flat_a | flat_b, 0.0, correlation)
    return np.where(both_flat & same_level, 1.0, correlation)


def near_duplicate_pairs(first: Fingerprints,
                         second: Fingerprints | None = None) -> list[tuple[int, int, int, float]]:
    """Return (i, j, Hamming distance, correlation) for every near-duplicate pair.

    With second None, the pairs i < j within first; otherwise i indexes first and
    j indexes second. Byte-identical pairs are included (distance 0, correlation 1).
    """
    within = second is None
    second = first if second is None else second
    if len(first) == 0 or len(second) == 0:
        return []
    bits_first, bits_second = _hash_bits(first.hashes), _hash_bits(second.hashes)
    candidates_i, candidates_j, distances = [], [], []
    for start in range(0, len(first), _ROWS_PER_BLOCK):
        block = bits_first[start:start + _ROWS_PER_BLOCK]
        # Hamming distance as two matrix products: bits set in a but not in b,
        # plus bits set in b but not in a. float32 represents these counts exactly.
        distance = block @ (1.0 - bits_second).T + (1.0 - block) @ bits_second.T
        rows, columns = np.nonzero(distance <= NEAR_MAX_HAMMING)
        if within:
            upper = rows + start < columns
            rows, columns = rows[upper], columns[upper]
        candidates_i.append(rows + start)
        candidates_j.append(columns)
        distances.append(distance[rows, columns].astype(int))
    i_all, j_all, d_all = np.concatenate(candidates_i), np.concatenate(candidates_j), np.concatenate(distances)

    pairs = []
    for start in range(0, len(i_all), _ROWS_PER_BLOCK):
        i, j = i_all[start:start + _ROWS_PER_BLOCK], j_all[start:start + _ROWS_PER_BLOCK]
        correlation = _thumbnail_correlation(first.thumbnails[i], second.thumbnails[j])
        for k in np.flatnonzero(correlation >= NEAR_MIN_CORRELATION):
            pairs.append((int(i[k]), int(j[k]), int(d_all[start + k]), round(float(correlation[k]), 4)))
    return pairs


def exact_duplicate_pairs(first: Fingerprints, second: Fingerprints) -> list[tuple[int, int]]:
    """Return (i, j) for every byte-identical pair between two sets of fingerprints."""
    by_digest = defaultdict(list)
    for j, digest in enumerate(second.sha256):
        by_digest[digest].append(j)
    return [(i, j) for i, digest in enumerate(first.sha256) for j in by_digest.get(digest, [])]


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # The smaller index becomes the root, so group ids do not depend on pair order.
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def group_ids(size: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Return a group id per item: items joined by pairs, directly or through others,
    share the id of their smallest index. Unpaired items are their own group."""
    union_find = _UnionFind(size)
    for a, b in pairs:
        union_find.union(a, b)
    return [union_find.find(i) for i in range(size)]


def duplicate_groups(fingerprints: Fingerprints) -> list[int]:
    """Return a group id per image, shared by images that are exact or near duplicates."""
    by_digest: dict[str, int] = {}
    pairs = []
    for i, digest in enumerate(fingerprints.sha256):
        pairs.append((by_digest.setdefault(digest, i), i))
    pairs += [(i, j) for i, j, _, _ in near_duplicate_pairs(fingerprints)]
    return group_ids(len(fingerprints), pairs)


def cross_duplicates(first: Fingerprints, second: Fingerprints) -> dict[int, list[tuple[int, str]]]:
    """Return {i: [(j, "exact" or "near"), ...]} for each image of first that
    duplicates images of second."""
    matches: dict[int, dict[int, str]] = defaultdict(dict)
    for i, j, _, _ in near_duplicate_pairs(first, second):
        matches[i][j] = "near"
    for i, j in exact_duplicate_pairs(first, second):
        matches[i][j] = "exact"
    return {i: sorted(found.items()) for i, found in sorted(matches.items())}


def _as_listing(folder_or_listing: Listing | str | os.PathLike, class_names=None) -> Listing:
    if isinstance(folder_or_listing, Listing):
        return folder_or_listing
    return list_images(folder_or_listing, class_names, require_all=False)


def find_leaks(test: Listing | str | os.PathLike, train: Listing | str | os.PathLike,
               workers: int | None = None) -> set[str]:
    """Return the test images (paths relative to the test root) that duplicate,
    exactly or nearly, an image of the training folder.

    A model has seen these images, or copies of them, during training, so they
    overstate its accuracy. Either argument may be a Listing or a folder laid out
    as FOLDER/<class>/<image>; folders may lack classes. Files that cannot be
    decoded match nothing.
    """
    test_listing, train_listing = _as_listing(test), _as_listing(train)
    test_prints, _, _ = fingerprint_listing(test_listing, workers)
    train_prints, _, _ = fingerprint_listing(train_listing, workers)
    return {test_prints.paths[i] for i in cross_duplicates(test_prints, train_prints)}


def leak_free_test_paths(test: Listing | str | os.PathLike, train: Listing | str | os.PathLike,
                         workers: int | None = None) -> list[str]:
    """Return the test images (relative paths, in listing order) with no exact or
    near duplicate in the training folder: the set for a leak-free evaluation.

    Arguments as for find_leaks. Files that cannot be decoded are kept, so the
    evaluation can report them as it does for any test image.
    """
    test_listing = _as_listing(test)
    leaks = find_leaks(test_listing, train, workers)
    return [path for path in test_listing.paths if path not in leaks]


@dataclass
class TrainingImages:
    """The training folder's images after screening, ready for the split.

    Attributes:
        paths, labels: the usable images, in listing order.
        groups: a duplicate-group id per image, for the group-aware split.
        skipped: (relative path, reason) for files that failed to decode.
        excluded: (training path, test path) for images left out because they
            duplicate an image of the test folder.
    """

    paths: list[str]
    labels: list[int]
    groups: list[int]
    skipped: list[tuple[str, str]]
    excluded: list[tuple[str, str]]

    @property
    def duplicate_group_count(self) -> int:
        """Groups that join two or more images."""
        sizes: dict[int, int] = defaultdict(int)
        for group in self.groups:
            sizes[group] += 1
        return sum(1 for size in sizes.values() if size > 1)


def screen_training_images(listing: Listing, exclude_duplicates_of: str | os.PathLike | None = None,
                           workers: int | None = None) -> TrainingImages:
    """Decode every listed training image once, drop the undecodable ones, drop
    the duplicates of a test folder, and group the remaining duplicates.

    Raises:
        ValueError: the test folder cannot be listed, or no image of some class
            is left.
    """
    prints, decoded, failed = fingerprint_listing(listing, workers)
    keep = list(range(len(decoded)))
    excluded: list[tuple[str, str]] = []
    if exclude_duplicates_of is not None:
        test_listing = list_images(exclude_duplicates_of, listing.class_names, require_all=False)
        test_prints, _, _ = fingerprint_listing(test_listing, workers)
        matches = cross_duplicates(prints, test_prints)
        excluded = [(prints.paths[i], test_prints.paths[found[0][0]]) for i, found in matches.items()]
        keep = [i for i in keep if i not in matches]

    kept_prints = prints.subset(keep)
    labels = [listing.labels[decoded[i]] for i in keep]
    missing = [name for label, name in enumerate(listing.class_names) if label not in set(labels)]
    if missing:
        raise ValueError(
            f"no usable training images left in class folder(s) {', '.join(missing)} under {listing.root} "
            f"after skipping {len(failed)} undecodable files and {len(excluded)} duplicates of the test "
            f"folder; `python -m hvdmri.data check` names them")
    return TrainingImages(paths=kept_prints.paths, labels=labels, groups=duplicate_groups(kept_prints),
                          skipped=failed, excluded=excluded)
