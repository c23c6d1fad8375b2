"""Stratified split and sharding."""

from collections import Counter

import numpy as np
import pytest

from hvdmri.data.split import shard, steps_per_epoch, stratified_split


def test_split_is_deterministic_and_stratified():
    labels = [0] * 40 + [1] * 30 + [2] * 20 + [3] * 10
    train_a, val_a = stratified_split(labels, 0.1, seed=7)
    train_b, val_b = stratified_split(labels, 0.1, seed=7)
    assert np.array_equal(train_a, train_b)
    assert np.array_equal(val_a, val_b)
    assert Counter(labels[i] for i in val_a) == {0: 4, 1: 3, 2: 2, 3: 1}
    assert sorted(np.concatenate([train_a, val_a]).tolist()) == list(range(100))


def test_split_changes_with_seed():
    labels = [0, 1, 2, 3] * 25
    _, val_a = stratified_split(labels, 0.2, seed=1)
    _, val_b = stratified_split(labels, 0.2, seed=2)
    assert not np.array_equal(val_a, val_b)


def test_split_rejects_fraction_too_small_for_classes():
    with pytest.raises(ValueError, match="--val-fraction"):
        stratified_split([0, 1, 2, 3] * 3, 0.1, seed=0)


def test_zero_fraction_keeps_everything_for_training():
    train, val = stratified_split([0, 1, 2, 3], 0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3]
    assert val.size == 0


def test_shards_are_disjoint_and_cover_all():
    indices = np.arange(7)
    shards = [shard(indices, rank, 2) for rank in range(2)]
    assert shards[0].tolist() == [0, 2, 4, 6]
    assert shards[1].tolist() == [1, 3, 5]


@pytest.mark.parametrize("n_images, world_size, batch, expected", [
    (7, 2, 3, 2),    # shards of 4 and 3: both ranks run 2 steps
    (6, 2, 3, 1),
    (1, 1, 16, 1),
    (5708, 4, 16, 90),
])
def test_steps_per_epoch_equal_for_every_rank(n_images, world_size, batch, expected):
    assert steps_per_epoch(n_images, world_size, batch) == expected
