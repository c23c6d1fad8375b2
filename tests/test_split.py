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


def grouped_labels(seed: int = 0):
    """100 images in 4 classes; every third image of a class shares a group with the next one."""
    labels = [0] * 40 + [1] * 30 + [2] * 20 + [3] * 10
    groups = list(range(100))
    for i in range(0, 99, 3):
        if labels[i] == labels[i + 1]:
            groups[i + 1] = groups[i]
    return labels, groups


def test_unique_groups_give_the_plain_split():
    labels = [0] * 40 + [1] * 30 + [2] * 20 + [3] * 10
    plain = stratified_split(labels, 0.2, seed=5)
    grouped = stratified_split(labels, 0.2, seed=5, groups=list(range(100, 200)))
    assert np.array_equal(plain[0], grouped[0])
    assert np.array_equal(plain[1], grouped[1])


def test_groups_stay_on_one_side():
    labels, groups = grouped_labels()
    train, val = stratified_split(labels, 0.2, seed=1, groups=groups)
    train_groups = {groups[i] for i in train}
    val_groups = {groups[i] for i in val}
    assert not train_groups & val_groups
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))


def test_group_split_keeps_class_ratios():
    labels, groups = grouped_labels()
    _, val = stratified_split(labels, 0.2, seed=1, groups=groups)
    counts = Counter(labels[i] for i in val)
    # Quotas of 20 validation images: 8, 6, 4, 2. Groups of two can leave a class one short.
    for label, quota in {0: 8, 1: 6, 2: 4, 3: 2}.items():
        assert quota - 1 <= counts[label] <= quota, (label, counts)


def test_group_split_is_deterministic_per_seed():
    labels, groups = grouped_labels()
    first = stratified_split(labels, 0.2, seed=4, groups=groups)
    again = stratified_split(labels, 0.2, seed=4, groups=groups)
    other = stratified_split(labels, 0.2, seed=5, groups=groups)
    assert np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_group_larger_than_quota_goes_to_training():
    labels = [0] * 12 + [1] * 12
    groups = [0] * 10 + list(range(1, 15))  # ten class-0 images are one group
    train, val = stratified_split(labels, 0.25, seed=0, groups=groups)
    assert set(range(10)) <= set(train.tolist())
    assert Counter(labels[i] for i in val) == {0: 2, 1: 3}


def test_group_spanning_classes_counts_for_its_majority():
    labels = [0, 0, 1] + [0] * 9 + [1] * 12
    groups = [0, 0, 0] + list(range(1, 22))
    train, val = stratified_split(labels, 0.25, seed=2, groups=groups)
    assert {0, 1, 2} <= set(train.tolist()) or {0, 1, 2} <= set(val.tolist())
    assert set(Counter(labels[i] for i in train)) == {0, 1}


def test_group_split_keeps_every_class_in_training():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    groups = [0, 0, 1, 2, 3, 4, 5, 6]
    train, val = stratified_split(labels, 0.5, seed=0, groups=groups)
    assert set(labels[i] for i in train) == {0, 1, 2, 3}


def test_group_count_must_match_labels():
    with pytest.raises(ValueError, match="groups has 3 entries for 8 labels"):
        stratified_split([0, 1, 2, 3] * 2, 0.5, seed=0, groups=[0, 1, 2])
