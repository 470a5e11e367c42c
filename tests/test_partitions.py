"""Partitioners keep every sample at most once (exactly once where the scheme promises it)
and respect alpha / k."""

import numpy as np
import pytest

from fedsim.world.partition import partition_indices, train_val_split, val_count

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


# ----------------------------------------------------------------------------- one pass == per client
# partition_indices reads every client's indices from one partitioner run (and computes IID
# blocks directly). The reference below is the per-client path it replaced: one table, then
# the partitioner's public load_partition(i) for every client.


def _per_client_reference(labels, num_clients, name, *, seed, alpha=0.5, classes_per_client=2,
                          shards_per_client=2, min_partition_size=2):
    import datasets
    from flwr_datasets import partitioner as P

    order = np.random.default_rng(seed).permutation(len(labels))
    table = datasets.Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    n = len(labels)
    part = {
        "iid": lambda: P.IidPartitioner(num_clients),
        "dirichlet": lambda: P.DirichletPartitioner(num_clients, "label", alpha, min_partition_size=min_partition_size,
                                                    self_balancing=False, seed=seed),
        "inner_dirichlet": lambda: P.InnerDirichletPartitioner(
            [n // num_clients + (1 if i < n % num_clients else 0) for i in range(num_clients)], "label", alpha,
            seed=seed),
        "pathological": lambda: P.PathologicalPartitioner(num_clients, "label", classes_per_client,
                                                          class_assignment_mode="first-deterministic", seed=seed),
        "shards": lambda: P.ShardPartitioner(num_clients, "label", num_shards_per_partition=shards_per_client,
                                             seed=seed),
    }[name]()
    part.dataset = table
    return [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]


UNEVEN = np.random.default_rng(11).choice(10, 1003, p=np.linspace(1, 3, 10) / 20)  # uneven classes, odd size

CASES = [  # (name, num_clients, kwargs)
    ("iid", 1, {}), ("iid", 7, {}), ("iid", 64, {}),
    ("dirichlet", 5, {"alpha": 0.3}), ("dirichlet", 40, {"alpha": 0.5, "min_partition_size": 0}),
    ("dirichlet", 12, {"alpha": 100.0}),
    ("inner_dirichlet", 3, {"alpha": 0.2}), ("inner_dirichlet", 30, {"alpha": 1.0}),
    ("pathological", 10, {"classes_per_client": 1}), ("pathological", 25, {"classes_per_client": 3}),
    ("pathological", 7, {"classes_per_client": 10}),
    ("shards", 7, {"shards_per_client": 2}), ("shards", 50, {"shards_per_client": 3}),
]


@pytest.mark.parametrize("labels", [LABELS, UNEVEN], ids=["balanced", "uneven"])
@pytest.mark.parametrize("name,num_clients,kwargs", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("seed", [0, 123456])
def test_same_indices_as_per_client_load_partition(labels, name, num_clients, kwargs, seed):
    got = partition_indices(labels, num_clients, name, seed=seed, **kwargs)
    want = _per_client_reference(labels, num_clients, name, seed=seed, **kwargs)
    assert len(got) == len(want) == num_clients
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.int64, i
        np.testing.assert_array_equal(g, w, err_msg=f"client {i}")  # same content, same order


def test_changed_flwr_datasets_internals_fail_loudly(monkeypatch):
    """An upgrade that renames the partition-id mapping must stop partitioning, not mis-assign data."""
    from flwr_datasets.partitioner import DirichletPartitioner

    load = DirichletPartitioner.load_partition

    def load_then_rename(self, i):
        out = load(self, i)
        self._id_to_indices = vars(self).pop("_partition_id_to_indices")  # as if an upgrade renamed it
        return out

    monkeypatch.setattr(DirichletPartitioner, "load_partition", load_then_rename)
    with pytest.raises(RuntimeError, match="no longer keeps _partition_id_to_indices"):
        partition_indices(LABELS, 4, "dirichlet", seed=0)


def test_mapping_that_disagrees_with_load_partition_fails_loudly(monkeypatch):
    from flwr_datasets.partitioner import ShardPartitioner

    load = ShardPartitioner.load_partition
    # As if an upgrade stopped sorting the dataset in place: the mapping's positions then
    # point at the wrong rows.
    monkeypatch.setattr(ShardPartitioner, "load_partition",
                        lambda self, i: load(self, i).shuffle(seed=1))
    with pytest.raises(RuntimeError, match="disagrees with load_partition"):
        partition_indices(LABELS, 4, "shards", seed=0)


def test_val_count_matches_split():
    for n in range(0, 30):
        for frac in (0.0, 0.05, 0.1, 0.5, 0.9):
            split = train_val_split(np.arange(n), frac, seed=n)
            assert len(split.val) == val_count(n, frac) and len(split.train) == n - len(split.val)
