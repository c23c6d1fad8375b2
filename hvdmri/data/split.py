"""Stratified train/validation split and per-rank shards with equal step counts."""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation sets with the class ratios kept.

    The result depends only on labels, val_fraction and seed, so every rank that
    holds the same listing computes the same split without talking to the others.

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
    train, val = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


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
