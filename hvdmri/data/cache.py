"""An on-disk cache of decoded, resized images, one folder per rank, image size and split.

    python -m hvdmri.train --data Training --cache-dir /local/scratch/hvdmri-cache

The first epoch decodes each image of the rank's shard and writes the uint8
result into a fixed-size slot of the rank's cache file. Later epochs read the
slot back instead of decoding. Augmentation and ResNet-50 preprocessing run
after the cache, so every epoch still sees fresh augmentations.

Why not tf.data's own ``Dataset.cache(filename)``:
- it is only complete once one pass has read every element. Training repeats
  the shard and ends each epoch after a fixed number of steps, so a pass rarely
  ends on an epoch boundary, and TF 2.15 discards the partial cache of an
  iterator that stopped early (checked with a 100-element range read 30 deep).
- it holds a ``_0.lockfile`` while writing, and any second iterator on the same
  file fails with AlreadyExistsError. A worker killed mid-pass leaves the lock
  behind, so the next run fails until someone deletes it by hand.
- caching decoded images before the shuffle would force the shuffle buffer to
  hold decoded images; here the shuffle still runs over paths and indices.

Why not a memory-mapped array: the pages a worker touches count towards its
resident memory (RSS), which is what an 8 GB node and the memory budget watch.
Reads and writes here use ``os.pread``/``os.pwrite`` on fixed-size slots, so
the process holds one image per decode thread; the kernel's page cache may keep
more, but it can drop those pages under memory pressure.

Layout of ``CACHE_DIR/rank{rank}-{size}px-{split}/`` (split: train or val):
- ``images.bin``: slot i holds image i of the shard, size x size x 3 bytes.
- ``checksums.bin``: one little-endian uint64 per slot, CRC-32 of the slot plus
  one. 0 means the slot is empty. A slot whose bytes do not match its checksum
  (a worker killed between the two writes, a damaged disk) counts as empty and
  is decoded and written again.
- ``meta.json``: the key, written last. A folder without it, with another key
  or with files of the wrong size is deleted and rebuilt.

The key hashes the shard's paths, file sizes and modification times, the image
size, the OpenCV version and the source of the decode functions. Changing the
file list, the number of workers (which changes the shards), the image size or
the decoding therefore starts a new cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np

from hvdmri.data import decode

FORMAT_VERSION = 1
_CHECKSUM_BYTES = 8


def cache_key(paths: list[str], image_size: int) -> str:
    """Return a hex digest that changes when the files, the image size or the decoding change."""
    digest = hashlib.sha256()
    # Hashing the decode functions' source replaces a version number that someone
    # would have to remember to bump when decode.py changes.
    decoder_source = "".join(inspect.getsource(function) for function in (
        decode.decode_image, decode.to_rgb8, decode._scale_to_uint8, decode.resize, decode.load_image))
    digest.update(f"format {FORMAT_VERSION}\nsize {image_size}\nopencv {cv2.__version__}\n".encode())
    digest.update(decoder_source.encode())
    for path in paths:
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\n".encode())
    return digest.hexdigest()


class ImageCache:
    """One rank's cache of decoded, resized uint8 RGB images, addressed by shard position.

    get() and put() are safe to call from the parallel decode threads of a
    tf.data map: each call reads or writes its own byte range with pread/pwrite,
    which take an explicit offset and share no file position.
    """

    def __init__(self, cache_dir: str | os.PathLike, rank: int, paths: list[str], image_size: int,
                 split: str = "train"):
        self.folder = Path(cache_dir) / f"rank{rank}-{image_size}px-{split}"
        self.size = len(paths)
        self.image_shape = (image_size, image_size, 3)
        self.slot_bytes = image_size * image_size * 3
        self.key = cache_key(paths, image_size)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        # The first failed write (a full disk, say); after it put() no longer writes.
        self.write_error: OSError | None = None
        self.rebuilt = False
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        images_path = self.folder / "images.bin"
        checksums_path = self.folder / "checksums.bin"
        if not self._matches(images_path, checksums_path):
            self.rebuilt = self.folder.exists()  # an outdated or damaged cache, not a first run
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            # Sparse files: truncate() reserves the size without writing zeros.
            with open(images_path, "wb") as handle:
                handle.truncate(self.size * self.slot_bytes)
            with open(checksums_path, "wb") as handle:
                handle.truncate(self.size * _CHECKSUM_BYTES)
            meta = {"key": self.key, "images": self.size, "image_shape": list(self.image_shape),
                    "format": FORMAT_VERSION}
            temporary = self.folder / "meta.json.tmp"
            temporary.write_text(json.dumps(meta))
            os.replace(temporary, self.folder / "meta.json")
        self._images = os.open(images_path, os.O_RDWR)
        self._checksums = os.open(checksums_path, os.O_RDWR)

    def _matches(self, images_path: Path, checksums_path: Path) -> bool:
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
            return (meta.get("key") == self.key
                    and images_path.stat().st_size == self.size * self.slot_bytes
                    and checksums_path.stat().st_size == self.size * _CHECKSUM_BYTES)
        except (OSError, ValueError):
            return False

    def get(self, index: int) -> np.ndarray | None:
        """Return image index, or None when its slot is empty or fails its checksum."""
        raw = os.pread(self._checksums, _CHECKSUM_BYTES, index * _CHECKSUM_BYTES)
        stored = int.from_bytes(raw, "little") if len(raw) == _CHECKSUM_BYTES else 0
        if stored == 0:
            self._count("misses")
            return None
        data = os.pread(self._images, self.slot_bytes, index * self.slot_bytes)
        if len(data) != self.slot_bytes or zlib.crc32(data) + 1 != stored:
            self._count("corrupt")
            self._count("misses")
            return None
        self._count("hits")
        return np.frombuffer(data, np.uint8).reshape(self.image_shape)

    def put(self, index: int, image: np.ndarray) -> None:
        """Write image index; the checksum goes last, so a half-written slot reads as empty."""
        if image.shape != self.image_shape or image.dtype != np.uint8:
            raise ValueError(f"cache slot {index}: expected a {self.image_shape} uint8 image, "
                             f"got {image.shape} {image.dtype}")
        if self.write_error:
            return
        data = np.ascontiguousarray(image).tobytes()
        try:
            os.pwrite(self._images, data, index * self.slot_bytes)
            os.pwrite(self._checksums, (zlib.crc32(data) + 1).to_bytes(_CHECKSUM_BYTES, "little"),
                      index * _CHECKSUM_BYTES)
        except OSError as error:
            # The files are sparse, so a disk can fill up after the cache opened. Training
            # goes on without caching: the slot's checksum is unwritten, so it reads as empty.
            self.write_error = error
            from hvdmri.distributed import get_logger

            get_logger().warning("--cache-dir: writing the image cache failed (%s); training continues "
                                 "without caching further images", error.strerror or error)

    def count_filled(self) -> int:
        """Return how many slots hold an image (checksums are not verified here)."""
        table = os.pread(self._checksums, self.size * _CHECKSUM_BYTES, 0)
        return int(np.count_nonzero(np.frombuffer(table, "<u8")))

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def take_stats(self) -> dict[str, int]:
        """Return hits, misses and corrupt slots since the previous call, and reset them."""
        with self._lock:
            stats = {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}
            self.hits = self.misses = self.corrupt = 0
        return stats

    def close(self) -> None:
        # -1 marks a closed descriptor, so a second close() (from __del__) cannot
        # close a number the process has since reused for another file.
        for name in ("_images", "_checksums"):
            descriptor = getattr(self, name, -1)
            if descriptor >= 0:
                os.close(descriptor)
                setattr(self, name, -1)

    def __del__(self):
        self.close()


def open_rank_caches(cache_dir: str, rank: int, image_size: int, train_paths: list[str],
                     val_paths: list[str]) -> tuple[ImageCache, ImageCache]:
    """Open (or create) this rank's training and validation caches and log rank 0's state.

    Raises:
        UsageError: the folder cannot be created or written.
    """
    from hvdmri.distributed import UsageError, get_logger

    try:
        caches = (ImageCache(cache_dir, rank, train_paths, image_size, "train"),
                  ImageCache(cache_dir, rank, val_paths, image_size, "val"))
    except OSError as error:
        raise UsageError(f"--cache-dir {cache_dir}: cannot create the image cache ({error}); "
                         f"give a writable folder on local disk, or leave the flag out") from None
    for cache in caches:
        state = "new or rebuilt: its key or file sizes did not match" if cache.rebuilt else \
            f"{cache.count_filled()} of {cache.size} images present"
        get_logger().info("--cache-dir: rank 0 cache %s (%.0f MB), %s", cache.folder,
                          cache.size * cache.slot_bytes / 1e6, state)
    return caches
