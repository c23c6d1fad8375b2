"""The on-disk cache of decoded images: hits, per-rank folders, invalidation, damage."""

import json
import os
import threading

import numpy as np
import pytest

from conftest import run_module
from hvdmri.data import pipeline
from hvdmri.data.cache import ImageCache
from hvdmri.data.decode import load_image
from hvdmri.data.pipeline import make_dataset


class DecodeCounter:
    """Wrap pipeline.load_image and count calls; the tf.data map calls it from several threads."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, path, image_size):
        with self._lock:
            self.calls += 1
        return load_image(path, image_size)


@pytest.fixture
def decodes(monkeypatch) -> DecodeCounter:
    counter = DecodeCounter()
    monkeypatch.setattr(pipeline, "load_image", counter)
    return counter


@pytest.fixture
def shard(phantom_dir) -> tuple[list[str], list[int]]:
    paths = sorted(str(path) for path in phantom_dir.rglob("*") if path.is_file())
    return paths, [index % 4 for index in range(len(paths))]


def read_all(dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_second_epoch_reads_cache(tmp_path, shard, decodes):
    paths, labels = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    dataset = make_dataset(paths, labels, 32, 8, training=False, cache=cache)

    read_all(dataset)
    assert decodes.calls == len(paths)
    assert cache.count_filled() == len(paths)
    read_all(dataset)
    assert decodes.calls == len(paths)
    assert cache.take_stats()["hits"] == len(paths)


def test_training_decodes_each_file_once(tmp_path, shard, decodes):
    paths, labels = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    dataset = make_dataset(paths, labels, 32, 8, training=True, augment=True, seed=1, cache=cache)

    # Three epochs of a repeated, shuffled, augmented shard: decoding runs ahead,
    # but every read after the first pass is a cache hit.
    batches = 3 * len(paths) // 8
    for _ in dataset.take(batches):
        pass
    assert decodes.calls == len(paths)


def test_augmentation_still_varies(tmp_path, shard):
    paths, labels = shard
    single = paths[:1]
    cache = ImageCache(tmp_path / "cache", 0, single, 32)
    dataset = make_dataset(single, labels[:1], 32, 1, training=True, augment=True, seed=1, cache=cache)

    epochs = [images.numpy() for images, _, _ in dataset.take(3)]
    # Epochs 2 and 3 come from the cache; random flips, rotations and zooms must
    # still make them differ from each other.
    assert cache.count_filled() == 1
    assert not np.array_equal(epochs[1], epochs[2])


def test_batches_identical_with_and_without_cache(tmp_path, shard):
    paths, labels = shard
    plain_images, plain_labels = read_all(make_dataset(paths, labels, 32, 8, training=False))
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    cached = make_dataset(paths, labels, 32, 8, training=False, cache=cache)

    for _ in range(2):  # the first pass fills the cache, the second reads it
        images, batch_labels = read_all(cached)
        np.testing.assert_array_equal(images, plain_images)
        np.testing.assert_array_equal(batch_labels, plain_labels)


def test_ranks_get_own_folders(tmp_path, shard):
    paths, _ = shard
    rank0 = ImageCache(tmp_path / "cache", 0, paths[0::2], 32)
    rank1 = ImageCache(tmp_path / "cache", 1, paths[1::2], 32)
    rank0.put(0, load_image(paths[0], 32))

    assert rank0.folder != rank1.folder
    assert rank0.folder.name == "rank0-32px-train"
    assert rank1.folder.name == "rank1-32px-train"
    assert rank0.count_filled() == 1
    assert rank1.count_filled() == 0
    assert rank1.get(0) is None


def test_image_size_change_starts_new_cache(tmp_path, shard, decodes):
    paths, labels = shard
    read_all(make_dataset(paths, labels, 32, 8, training=False,
                          cache=ImageCache(tmp_path / "cache", 0, paths, 32)))
    bigger = ImageCache(tmp_path / "cache", 0, paths, 48)
    read_all(make_dataset(paths, labels, 48, 8, training=False, cache=bigger))

    assert decodes.calls == 2 * len(paths)
    assert bigger.folder.name == "rank0-48px-train"
    assert bigger.get(0).shape == (48, 48, 3)


def test_changed_file_list_rebuilds(tmp_path, shard):
    paths, _ = shard
    first = ImageCache(tmp_path / "cache", 0, paths, 32)
    first.put(0, load_image(paths[0], 32))
    first.close()

    fewer = ImageCache(tmp_path / "cache", 0, paths[1:], 32)
    assert fewer.rebuilt
    assert fewer.count_filled() == 0


def test_rewritten_image_rebuilds(tmp_path, shard):
    paths, _ = shard
    first = ImageCache(tmp_path / "cache", 0, paths, 32)
    first.put(0, load_image(paths[0], 32))
    first.close()
    stat = os.stat(paths[3])
    # Same name, new content: the key includes each file's modification time.
    os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    again = ImageCache(tmp_path / "cache", 0, paths, 32)
    assert again.rebuilt
    assert again.get(0) is None


def test_damaged_slot_is_decoded_again(tmp_path, shard, decodes):
    paths, labels = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    dataset = make_dataset(paths, labels, 32, 8, training=False, cache=cache)
    expected, _ = read_all(dataset)
    with open(cache.folder / "images.bin", "r+b") as handle:
        handle.seek(5 * cache.slot_bytes + 100)
        handle.write(b"\xff" * 64)

    images, _ = read_all(dataset)
    np.testing.assert_array_equal(images, expected)
    assert decodes.calls == len(paths) + 1
    assert cache.take_stats()["corrupt"] == 1


def test_truncated_cache_is_rebuilt(tmp_path, shard, decodes):
    paths, labels = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    read_all(make_dataset(paths, labels, 32, 8, training=False, cache=cache))
    cache.close()
    # A disk that filled up, or a copy that stopped half-way.
    with open(cache.folder / "images.bin", "r+b") as handle:
        handle.truncate(3 * cache.slot_bytes)

    again = ImageCache(tmp_path / "cache", 0, paths, 32)
    assert again.rebuilt
    assert again.count_filled() == 0
    read_all(make_dataset(paths, labels, 32, 8, training=False, cache=again))
    assert decodes.calls == 2 * len(paths)
    assert again.count_filled() == len(paths)


def test_missing_meta_is_rebuilt(tmp_path, shard):
    paths, _ = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    cache.put(0, load_image(paths[0], 32))
    cache.close()
    # A worker killed while creating the cache writes meta.json last.
    (cache.folder / "meta.json").unlink()

    again = ImageCache(tmp_path / "cache", 0, paths, 32)
    assert again.rebuilt
    assert again.count_filled() == 0


def test_undecodable_file_is_not_cached(tmp_path, shard, decodes):
    paths, labels = shard
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths, labels = paths[:4] + [str(broken)], labels[:4] + [0]
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    dataset = make_dataset(paths, labels, 32, 8, training=False, cache=cache)

    for _ in range(2):
        images, _ = read_all(dataset)
        assert len(images) == 4
    assert cache.count_filled() == 4
    # The broken file is tried in both epochs, the four good ones once.
    assert decodes.calls == 4 + 2


@pytest.mark.slow
def test_train_cli_fills_cache(tmp_path, phantom_dir):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = run_module(["hvdmri.train", "--data", str(phantom_dir), "--weights", "none", "--image-size", "32",
                         "--batch-size", "8", "--scratch-epochs", "2", "--val-fraction", "0.25",
                         "--cache-dir", str(cache_dir), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--cache-dir: rank 0 cache" in result.stdout
    assert sorted(path.name for path in cache_dir.iterdir()) == ["rank0-32px-train", "rank0-32px-val"]
    for folder in cache_dir.iterdir():
        meta = json.loads((folder / "meta.json").read_text())
        checksums = np.fromfile(folder / "checksums.bin", "<u8")
        assert len(checksums) == meta["images"]
        assert np.count_nonzero(checksums) == meta["images"], folder.name


def test_full_disk_mid_epoch_stops_caching(tmp_path, shard, monkeypatch):
    import errno

    from hvdmri.data import cache as cache_module

    paths, labels = shard
    cache = ImageCache(tmp_path / "cache", 0, paths, 32)
    real_pwrite, writes = os.pwrite, []

    def pwrite_until_full(fd, data, offset):
        # Two writes per image (pixels, then checksum): the disk is full after four writes.
        if len(writes) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(cache_module.os, "pwrite", pwrite_until_full)
    images, _ = read_all(make_dataset(paths, labels, 32, 8, training=False, cache=cache))
    monkeypatch.undo()
    uncached, _ = read_all(make_dataset(paths, labels, 32, 8, training=False))
    assert np.array_equal(images, uncached)
    # Parallel decode threads interleave their writes, so one or two slots were completed.
    assert 1 <= cache.count_filled() <= 2
    assert cache.write_error.errno == errno.ENOSPC
