"""What a scenario resolves to in a process: the data set, each client's split, the model.

Built once per process and cached by the scenario text (ClientApps in one worker
process share it), so a round never reloads or re-partitions data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import ImageDataset, load_dataset
from .models import build_model
from .partition import ClientSplit, partition_indices, train_val_split
from .scenario import Scenario, scenario_from_text

MODEL_STREAM, SPLIT_STREAM = 3, 4


@dataclass
class World:
    scenario: Scenario
    dataset: ImageDataset
    splits: list[ClientSplit]
    _tensors: dict = field(default_factory=dict, repr=False)

    def new_model(self) -> nn.Module:
        """The global model at round 0 (same weights in every process for one seed)."""
        m = self.scenario.model
        seed = int(np.random.default_rng([self.scenario.seed, MODEL_STREAM]).integers(2**62))
        return build_model(m.name, self.dataset.channels, self.dataset.image_size, self.dataset.num_classes,
                           dropout=m.dropout, hidden=tuple(m.hidden), init=m.init, seed=seed)

    def client_tensors(self, partition_id: int) -> tuple[torch.Tensor, ...]:
        """(x, y, x_val, y_val) of one client, gathered once per process."""
        cached = self._tensors.get(partition_id)
        if cached is None:
            split = self.splits[partition_id]
            ds = self.dataset
            cached = self._tensors[partition_id] = (ds.x_train[split.train], ds.y_train[split.train],
                                                     ds.x_train[split.val], ds.y_train[split.val])
        return cached

    def __getstate__(self) -> dict:  # shipped to workers without the per-process cache
        return {**self.__dict__, "_tensors": {}}


def dataset_for(s: Scenario) -> ImageDataset:
    d = s.data
    return load_dataset(d.dataset, root=d.root, source=d.source, seed=s.seed, image_size=d.image_size,
                        synthetic_classes=d.synthetic.classes, synthetic_channels=d.synthetic.channels,
                        synthetic_size=d.synthetic.size, synthetic_train=d.synthetic.train,
                        synthetic_test=d.synthetic.test)


def build_world(s: Scenario) -> World:
    ds = dataset_for(s)
    p = s.data.partition
    split_seed = int(np.random.default_rng([s.seed, SPLIT_STREAM]).integers(2**31))
    parts = partition_indices(ds.y_train.numpy(), s.data.num_clients, p.name, seed=split_seed, alpha=p.alpha,
                              classes_per_client=p.classes_per_client, shards_per_client=p.shards_per_client,
                              min_partition_size=p.min_partition_size)
    splits = [train_val_split(idx, s.data.val_fraction, split_seed + i) for i, idx in enumerate(parts)]
    empty = [i for i, sp in enumerate(splits) if len(sp.train) == 0]
    if empty:
        raise ValueError(f"partition: client {empty[0]} gets no training samples "
                         f"({len(empty)} clients empty); use fewer clients or a larger alpha/k")
    return World(s, ds, splits)


_WORLDS: dict[str, World] = {}


def world_from_text(scenario_yaml: str) -> World:
    """The world of a resolved scenario, built once per process."""
    world = _WORLDS.get(scenario_yaml)
    if world is None:
        world = _WORLDS[scenario_yaml] = build_world(scenario_from_text(scenario_yaml))
    return world


def checked_world(scenario_yaml: str) -> World:
    """``world_from_text``, with data that cannot be loaded or split reported as bad input.

    Raises ScenarioError naming the ``data.`` key concerned, the one-line error the CLI
    prints with exit code 2.
    """
    from .data import DataError
    from .scenario import ScenarioError

    try:
        return world_from_text(scenario_yaml)
    except (DataError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Data-layer messages start with the key under data. they concern (or none).
        raise ScenarioError(f"data.{msg}" if ":" in msg.split(" ")[0] else f"data: {msg}") from None


def adopt_world(scenario_yaml: str, world: World) -> None:
    """Use a world built elsewhere (an engine shipping it to its workers) instead of rebuilding it."""
    _WORLDS[scenario_yaml] = world
