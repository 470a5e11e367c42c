"""What a scenario resolves to in a process: the data set, each client's split, the model.

Built once per process for what it depends on (the seed, the ``data`` and ``model``
sections), so a round never reloads or re-partitions data, and scenarios that differ only
in how they train (``train``, ``strategy``, ``upload``, ``engine``, ``output``, ``name``)
share one World.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import memory
from .data import ImageDataset, load_dataset, nominal_shape
from .memory import MemoryRefused
from .models import build_model
from .partition import ClientSplit, partition_indices, train_val_split, val_count
from ..scenario.schema import DataConfig, ModelConfig, Scenario, scenario_from_text

# Independent streams of the one scenario seed: 1 client sampling (strategies.base), 2 local
# training (strategies.trainer), 3 model init, 4 data split, 5 DP noise (defenses.dp_user), 6 audit,
# 7 upload codecs (strategies.compression.CODEC_STREAM: the seed client and server share for sketches,
# and, per round and client, TernGrad's rounding and the sketch's noise), 8 DP-SGD's Poisson batches
# and 9 its gradient noise (defenses.dp_sgd; both keyed by the client's stream-2 seed of the round, so
# by (seed, round, partition id)), 10 the upload noise defense (defenses.upload_transforms; by (seed,
# round, partition id), plus 1 for the audit's gradient query), 11 the system model's devices
# (fedsim.world.system), 12 the asynchronous loop's choice of clients (fedsim.run.async_rounds), 13 the
# attack seeds of staleness: invert (fedsim.run.stale_inversion; by step and partition id).
MODEL_STREAM, SPLIT_STREAM = 3, 4


@dataclass
class World:
    """The data a scenario's clients and server use, and its initial model.

    It keeps only the sections it is built from (``seed``, ``data``, ``model``), not the
    scenario: one World serves every scenario with the same ``world_key``, so training
    settings must come from the caller's own scenario or message, never from here.
    """

    seed: int
    data: DataConfig
    model: ModelConfig
    dataset: ImageDataset
    parts: list[np.ndarray]  # each client's share of the training set, before its train/val split
    split_seed: int
    _tensors: dict = field(default_factory=dict, repr=False)

    def new_model(self) -> nn.Module:
        """The global model at round 0 (same weights in every process for one seed)."""
        m = self.model
        seed = int(np.random.default_rng([self.seed, MODEL_STREAM]).integers(2**62))
        return build_model(m.name, self.dataset.channels, self.dataset.image_size, self.dataset.num_classes,
                           dropout=m.dropout, dropout_at=m.dropout_at, hidden=tuple(m.hidden), init=m.init,
                           seed=seed)

    def client_split(self, partition_id: int) -> ClientSplit:
        """One client's train/validation indices.

        Drawn when the client is first needed, not for every client up front: each client
        has its own seed, so the split is the same either way, and a round of 100 out of
        100,000 clients pays for 100 generators (~17 us each), not 100,000.
        """
        return train_val_split(self.parts[partition_id], self.data.val_fraction, self.split_seed + partition_id)

    def client_tensors(self, partition_id: int) -> tuple[torch.Tensor, ...]:
        """(x, y, x_val, y_val) of one client, gathered once per process."""
        cached = self._tensors.get(partition_id)
        if cached is None:
            split = self.client_split(partition_id)
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
    # Train sizes follow from the sizes alone: no split is drawn here (World.client_split does).
    empty = [i for i, idx in enumerate(parts) if len(idx) - val_count(len(idx), s.data.val_fraction) == 0]
    if empty:
        raise ValueError(f"partition: client {empty[0]} gets no training samples "
                         f"({len(empty)} clients empty); use fewer clients or a larger alpha/k")
    return World(s.seed, s.data, s.model, ds, parts, split_seed)


def world_key(seed: int, data: DataConfig, model: ModelConfig) -> str:
    """What a World depends on: the seed, the ``data`` and ``model`` sections (not train, strategy, ...)."""
    return json.dumps([seed, data.model_dump(mode="json"), model.model_dump(mode="json")], sort_keys=True)


# Worlds by world_key (each built once), and the same Worlds by scenario text: ClientApps
# look their world up by text on every call, and that stays a dict hit, with no parsing.
# Both are bounded: a process that runs many scenarios (a Ray worker a sweep reuses) keeps the
# MAX_WORLDS latest Worlds (each holds its data set) and MAX_TEXTS texts, not every one.
MAX_WORLDS = 4
MAX_TEXTS = 64
_BUILT: dict[str, World] = {}
_WORLDS: dict[str, World] = {}


def _keep_built(key: str, world: World) -> None:
    """Cache ``world`` under ``key`` as the latest; the oldest beyond MAX_WORLDS go, with their texts."""
    _BUILT.pop(key, None)
    _BUILT[key] = world
    while len(_BUILT) > MAX_WORLDS:
        old = _BUILT.pop(next(iter(_BUILT)))
        for text in [t for t, w in _WORLDS.items() if w is old]:
            del _WORLDS[text]


def _keep_text(scenario_yaml: str, world: World) -> None:
    _WORLDS.pop(scenario_yaml, None)
    _WORLDS[scenario_yaml] = world
    while len(_WORLDS) > MAX_TEXTS:
        del _WORLDS[next(iter(_WORLDS))]


def world_from_text(scenario_yaml: str) -> World:
    """The world of a resolved scenario; its data is built once per process per ``world_key``
    (while it is among the MAX_WORLDS latest)."""
    world = _WORLDS.get(scenario_yaml)
    if world is None:
        s = scenario_from_text(scenario_yaml)
        key = world_key(s.seed, s.data, s.model)
        world = _BUILT.get(key)
        if world is None:
            world = build_world(s)
        _keep_built(key, world)
        _keep_text(scenario_yaml, world)
    return world


def checked_world(scenario_yaml: str) -> World:
    """``world_from_text``, with data that cannot be loaded or split reported as bad input.

    Raises ScenarioError naming the ``data.`` key concerned, the one-line error the CLI
    prints with exit code 2.
    """
    from .data import DataError
    from ..scenario.schema import ScenarioError

    try:
        check_memory(scenario_from_text(scenario_yaml))
        return world_from_text(scenario_yaml)
    except MemoryRefused as exc:
        raise ScenarioError(str(exc)) from None
    except (DataError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Data-layer messages start with the key under data. they concern (or none).
        raise ScenarioError(f"data.{msg}" if ":" in msg.split(" ")[0] else f"data: {msg}") from None


def check_memory(s: Scenario) -> None:
    """Refuse (MemoryRefused, naming the key) data and a model whose sizes alone exceed the
    memory available, before anything is loaded or built (``fedsim.world.memory``)."""
    d, m = s.data, s.model
    samples, channels, side = nominal_shape(d.dataset, image_size=d.image_size, synthetic_channels=d.synthetic.channels,
                                            synthetic_size=d.synthetic.size, synthetic_train=d.synthetic.train,
                                            synthetic_test=d.synthetic.test)
    classes = d.synthetic.classes if d.dataset == "synthetic" else 10
    data_key = "data.image_size" if d.image_size else ("data.synthetic" if d.dataset == "synthetic" else "data.dataset")
    params = memory.model_parameters(m.name, channels, side, classes, tuple(m.hidden))
    model_key = "model.hidden" if m.name == "mlp" else "model.name"
    if d.dataset == "synthetic" and params > 2 * memory.model_parameters(m.name, channels, side, 10, tuple(m.hidden)):
        model_key = "data.synthetic.classes"  # the classifier's rows, one per class, make the model large
    memory.check_fits([
        (data_key, memory.data_bytes(samples, channels, side), f"the data set ({samples} images of {channels}x{side}x{side})"),
        (model_key, memory.model_bytes(params), f"the model ({params:.3g} parameters, {memory.MODEL_COPIES} float32 copies)"),
    ])


def adopt_world(scenario_yaml: str, world: World) -> None:
    """Use a world built elsewhere (an engine shipping it to its workers) instead of rebuilding it."""
    key = world_key(world.seed, world.data, world.model)
    if key not in _BUILT:
        _keep_built(key, world)
    _keep_text(scenario_yaml, world)
