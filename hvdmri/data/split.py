"""Stratified train/validation split and per-rank shards with equal step counts."""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(labels: list[int], val_fraction: float, seed: int,
                     groups: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation sets with the class ratios kept.

    The result depends only on labels, val_fraction, seed and groups, so every
    rank that has the same listing computes the same split without talking to
    the others.

    Args:
        groups: a group id per image, e.g. from duplicates.duplicate_groups. All
            images of a group land on the same side, so a duplicate of a training
            image never sits in the validation set. Without groups, or when every
            group holds one image, the split is scikit-learn's stratified split.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    indices = np.arange(len(labels))
    if val_fraction <= 0:
        return indices, np.array([], dtype=int)
    labels = np.asarray(labels)
    n_classes = len(np.unique(labels))
    n_val = math.ceil(val_fraction * len(labels))
    if n_val < n_classes or len(labels) - n_val < n_classes:
        raise ValueError(
            f"--val-fraction {val_fraction} on {len(labels)} images leaves fewer than one image "
            f"per class on one side of the split; use more images or another fraction"
        )
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries for {len(labels)} labels; expected one per image")
    if groups is None or len(np.unique(groups)) == len(labels):
        train, val = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
        return np.sort(train), np.sort(val)
    return _group_stratified_split(labels, np.asarray(groups), n_val, seed)


def _group_stratified_split(labels: np.ndarray, groups: np.ndarray, n_val: int,
                            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill each class's validation quota with whole groups taken in a seeded random order.

    A group counts towards the class most of its images carry (the smallest
    label on a tie). A group larger than what is left of its class's quota goes
    to training, so a class's validation count can fall short of its quota when
    only large groups are left.
    """
    classes, class_sizes = np.unique(labels, return_counts=True)
    quotas = _class_quotas(class_sizes, n_val)
    quota_of = dict(zip(classes.tolist(), quotas))
    filled = {label: 0 for label in classes.tolist()}

    group_ids, inverse, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(group_sizes)[:-1])
    in_val = np.zeros(len(labels), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(group_ids)):
        group_labels, counts = np.unique(labels[members[g]], return_counts=True)
        label = int(group_labels[np.argmax(counts)])
        if filled[label] + len(members[g]) <= quota_of[label]:
            filled[label] += len(members[g])
            in_val[members[g]] = True
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def _class_quotas(class_sizes: np.ndarray, n_val: int) -> list[int]:
    """Share n_val among classes in proportion to their sizes, by largest remainder.

    Each quota stays below its class size, so training keeps every class.
    """
    exact = class_sizes * n_val / class_sizes.sum()
    quotas = np.floor(exact).astype(int)
    # Ties in the remainder go to the lower class index (stable sort).
    for k in np.argsort(-(exact - quotas), kind="stable")[: n_val - quotas.sum()]:
        quotas[k] += 1
    return np.minimum(quotas, class_sizes - 1).tolist()


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Return this rank's part of indices: every world_size-th element from rank.

    Shard sizes differ by at most one; steps_per_epoch() makes the step counts equal.
    """
    return np.asarray(indices)[rank::world_size]


def steps_per_epoch(n_images: int, world_size: int, local_batch_size: int) -> int:
    """Steps each rank runs in one epoch so that the ranks together see every image once.

    Every rank must run the same number of steps, because each step ends in an
    allreduce that waits for all ranks. Ranks whose shard is one image short wrap
    around to their first images (the training set repeats), so no rank runs dry.
    """
    global_batch_size = world_size * local_batch_size
    return max(1, math.ceil(n_images / global_batch_size))
