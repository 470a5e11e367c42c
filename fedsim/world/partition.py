"""Split a labelled data set over clients by name, with flwr-datasets partitioners.

- ``iid``: uniform random split (``IidPartitioner``'s contiguous blocks of a seeded
  shuffle, cut here directly).
- ``dirichlet``: per-class Dirichlet(alpha) over clients, as FedML / FedImpro
  (``DirichletPartitioner``; Hsu et al. 2019).
- ``inner_dirichlet``: per-client class prior from Dirichlet(alpha), equal client sizes,
  as FedDyn / FL-Simulator (``InnerDirichletPartitioner``).
- ``pathological``: k classes per client (``PathologicalPartitioner``; McMahan et al. 2017).
- ``shards``: sort by label, cut into shards, a few shards per client (``ShardPartitioner``).

Headline numbers under the two Dirichlets are not comparable (shared/specs/strategies.md).
Every client's share is then split into train and validation parts (``train_val_split``,
drawn per client when the client is first needed: ``fedsim.world.World.client_split``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray
    val: np.ndarray


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    name: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each client (disjoint; every sample at most once).

    The same arrays, in the same order, as ``load_partition(i)["idx"]`` of the
    partitioner for every client ``i``, computed in one pass (100,000 clients: one
    partitioning instead of 100,000 ``Dataset.select`` calls).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients > n:
        raise ValueError(f"num_clients: {num_clients} clients but only {n} training samples")
    order = np.random.default_rng(seed).permutation(n)
    if name == "iid":
        # IidPartitioner.load_partition(i) is ``dataset.shard(num_clients, i, contiguous=True)``:
        # contiguous blocks of the shuffled table, the first ``n % num_clients`` one row longer.
        # np.array_split cuts exactly those blocks, so there is no partitioner (nor a 3-s
        # ``datasets`` import) to run; tests/test_partitions.py checks it against IidPartitioner.
        return [block.astype(np.int64) for block in np.array_split(order, num_clients)]
    part = _partitioner(name, labels, num_clients, seed=seed, alpha=alpha, classes_per_client=classes_per_client,
                        shards_per_client=shards_per_client, min_partition_size=min_partition_size)
    import datasets  # ~3 s to import: only where a partitioner runs

    part.dataset = datasets.Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    return all_partitions(part)


def _partitioner(name: str, labels: np.ndarray, num_clients: int, *, seed: int, alpha: float,
                 classes_per_client: int, shards_per_client: int, min_partition_size: int):
    """The flwr-datasets partitioner behind a non-IID scheme name."""
    from flwr_datasets import partitioner as P

    n = len(labels)
    if name == "dirichlet":
        return P.DirichletPartitioner(num_clients, "label", alpha, min_partition_size=min_partition_size,
                                      self_balancing=False, seed=seed)
    if name == "inner_dirichlet":
        sizes = [n // num_clients + (1 if i < n % num_clients else 0) for i in range(num_clients)]
        return P.InnerDirichletPartitioner(sizes, "label", alpha, seed=seed)
    if name == "pathological":
        num_classes = len(np.unique(labels))
        if classes_per_client > num_classes:
            raise ValueError(f"partition.classes_per_client: {classes_per_client} exceeds the {num_classes} classes")
        return P.PathologicalPartitioner(num_clients, "label", classes_per_client,
                                         class_assignment_mode="first-deterministic", seed=seed)
    if name == "shards":
        if num_clients * shards_per_client > n:
            raise ValueError(f"partition.shards_per_client: {num_clients * shards_per_client} shards "
                             f"but only {n} training samples")
        return P.ShardPartitioner(num_clients, "label", num_shards_per_partition=shards_per_client, seed=seed)
    raise ValueError(f"unknown partition {name!r}")


def all_partitions(part) -> list[np.ndarray]:
    """The ``idx`` column of every partition of ``part``, without a ``Dataset.select`` each.

    The one place that reads flwr-datasets internals. Its mapping partitioners
    (Dirichlet, InnerDirichlet, Pathological, Shard; flwr-datasets 0.6.1) compute every
    partition on the first ``load_partition`` and keep the result in the private
    ``_partition_id_to_indices`` (partition id -> row positions in ``part.dataset``);
    ``load_partition(i)`` is ``part.dataset.select(that[i])``. Positions refer to
    ``part.dataset`` as the partitioner left it (ShardPartitioner sorts it by label first),
    so they are looked up in its ``idx`` column. If an upgrade renames or reshapes the
    mapping this raises rather than guess, and partition 0 is checked against the public
    ``load_partition(0)`` on every call (tests/test_partitions.py checks all of them).
    """
    first = part.load_partition(0)  # the public path: runs the partitioning and its checks once
    mapping = getattr(part, "_partition_id_to_indices", None)
    num = part.num_partitions
    if not isinstance(mapping, dict) or sorted(mapping) != list(range(num)):
        raise RuntimeError(f"flwr-datasets {type(part).__name__} no longer keeps _partition_id_to_indices "
                           "as {partition id: positions}; update fedsim.world.partition.all_partitions")
    idx = part.dataset.with_format("arrow")["idx"].to_numpy()  # one Arrow read; a numpy column is 30x slower
    parts = [idx[np.asarray(mapping[i], dtype=np.int64)] for i in range(num)]
    if not np.array_equal(parts[0], np.asarray(first["idx"], dtype=np.int64)):
        raise RuntimeError(f"flwr-datasets {type(part).__name__}._partition_id_to_indices disagrees with "
                           "load_partition(0); update fedsim.world.partition.all_partitions")
    return parts


def val_count(n: int, val_fraction: float) -> int:
    """How many of a client's ``n`` samples ``train_val_split`` puts in validation."""
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)  # at least one when asked for, never all
    return n_val


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> ClientSplit:
    """Seeded split of one client's indices into train and validation parts."""
    n_val = val_count(len(indices), val_fraction)
    perm = np.random.default_rng(seed).permutation(indices)
    return ClientSplit(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]))
