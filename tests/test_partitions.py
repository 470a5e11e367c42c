"""Partitioners keep every sample at most once (exactly once where the scheme promises it)
and respect alpha / k."""

import numpy as np
import pytest

from fedsim.partition import partition_indices, train_val_split

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("name", ["iid", "dirichlet", "inner_dirichlet"])
def test_every_sample_exactly_once(name):
    parts = partition_indices(LABELS, 8, name, seed=3, alpha=0.5)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS)
    assert np.array_equal(np.sort(allidx), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", ["pathological", "shards"])
def test_at_most_once(name):
    parts = partition_indices(LABELS, 8, name, seed=3, classes_per_client=2, shards_per_client=2)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    assert len(allidx) >= 0.9 * len(LABELS)


def test_pathological_k_classes():
    for k in (1, 2, 3):
        parts = partition_indices(LABELS, 10, "pathological", seed=0, classes_per_client=k)
        assert all(len(np.unique(LABELS[p])) <= k for p in parts)
        assert max(len(np.unique(LABELS[p])) for p in parts) == k


def test_shards_few_classes_per_client():
    parts = partition_indices(LABELS, 10, "shards", seed=0, shards_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


@pytest.mark.parametrize("name", ["dirichlet", "inner_dirichlet"])
def test_alpha_controls_skew(name):
    def mean_entropy(alpha):
        parts = partition_indices(LABELS, 10, name, seed=1, alpha=alpha, min_partition_size=0)
        return np.mean([_entropy(LABELS[p]) for p in parts if len(p)])

    skewed, mixed = mean_entropy(0.1), mean_entropy(100.0)
    assert skewed < 0.6 * mixed
    assert mixed > 0.95 * np.log(10)


def test_iid_is_balanced_and_seeded():
    a = partition_indices(LABELS, 6, "iid", seed=5)
    b = partition_indices(LABELS, 6, "iid", seed=5)
    c = partition_indices(LABELS, 6, "iid", seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert max(map(len, a)) - min(map(len, a)) <= 1


def test_inner_dirichlet_equal_sizes():
    parts = partition_indices(LABELS, 7, "inner_dirichlet", seed=0, alpha=0.3)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_too_many_clients():
    with pytest.raises(ValueError, match="num_clients"):
        partition_indices(LABELS[:5], 6, "iid", seed=0)


def test_train_val_split_disjoint_cover():
    idx = np.arange(100, 150)
    split = train_val_split(idx, 0.2, seed=0)
    assert len(split.val) == 10 and len(split.train) == 40
    assert np.array_equal(np.sort(np.concatenate([split.train, split.val])), idx)
    assert len(train_val_split(np.arange(3), 0.1, 0).val) == 1  # at least one when asked for
    assert len(train_val_split(np.arange(3), 0.0, 0).val) == 0
