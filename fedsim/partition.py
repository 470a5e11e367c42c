"""Split a labelled data set over clients by name, with flwr-datasets partitioners.

- ``iid``: uniform random split (``IidPartitioner`` over a seeded shuffle).
- ``dirichlet``: per-class Dirichlet(alpha) over clients, as FedML / FedImpro
  (``DirichletPartitioner``; Hsu et al. 2019).
- ``inner_dirichlet``: per-client class prior from Dirichlet(alpha), equal client sizes,
  as FedDyn / FL-Simulator (``InnerDirichletPartitioner``).
- ``pathological``: k classes per client (``PathologicalPartitioner``; McMahan et al. 2017).
- ``shards``: sort by label, cut into shards, a few shards per client (``ShardPartitioner``).

Headline numbers under the two Dirichlets are not comparable (shared/specs/strategies.md).
Every client's share is then split into train and validation parts.
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
    """Indices into ``labels`` for each client (disjoint; every sample at most once)."""
    import datasets  # ~3 s to import: only where partitioning happens
    from flwr_datasets import partitioner as P

    labels = np.asarray(labels)
    n = len(labels)
    if num_clients > n:
        raise ValueError(f"num_clients: {num_clients} clients but only {n} training samples")
    order = np.random.default_rng(seed).permutation(n)
    table = datasets.Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    if name == "iid":
        part = P.IidPartitioner(num_clients)
    elif name == "dirichlet":
        part = P.DirichletPartitioner(num_clients, "label", alpha, min_partition_size=min_partition_size,
                                      self_balancing=False, seed=seed)
    elif name == "inner_dirichlet":
        sizes = [n // num_clients + (1 if i < n % num_clients else 0) for i in range(num_clients)]
        part = P.InnerDirichletPartitioner(sizes, "label", alpha, seed=seed)
    elif name == "pathological":
        num_classes = len(np.unique(labels))
        if classes_per_client > num_classes:
            raise ValueError(f"partition.classes_per_client: {classes_per_client} exceeds the {num_classes} classes")
        part = P.PathologicalPartitioner(num_clients, "label", classes_per_client,
                                         class_assignment_mode="first-deterministic", seed=seed)
    elif name == "shards":
        if num_clients * shards_per_client > n:
            raise ValueError(f"partition.shards_per_client: {num_clients * shards_per_client} shards "
                             f"but only {n} training samples")
        part = P.ShardPartitioner(num_clients, "label", num_shards_per_partition=shards_per_client, seed=seed)
    else:
        raise ValueError(f"unknown partition {name!r}")
    part.dataset = table
    return [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> ClientSplit:
    """Seeded split of one client's indices into train and validation parts."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_val = int(round(val_fraction * len(perm)))
    if val_fraction > 0 and len(perm) >= 2:
        n_val = min(max(n_val, 1), len(perm) - 1)
    return ClientSplit(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]))
