"""Flower's own message-API strategies by name (FedAdam, FedYogi, FedAdagrad, FedAvgM, QFedAvg, FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan), aggregated by Flower's class itself.

fedsim adds three things around the Flower class and nothing to its rule:
- seeded sampling: the round's clients are fedsim's seeded choice (``sample_participants``), handed to the
  class's own ``configure_train`` as the only nodes it sees, so whatever the class does there (FedOpt and
  QFedAvg remember the arrays sent) runs as written; Flower's ``random.sample`` only orders them, and the
  messages come back sorted by node id (Python's global ``random`` is left as it was);
- every client setting in the config (``SeededSampling.round_config``), as for fedsim's own strategies;
- each reply's ArrayRecords handed to the class as copies of the record (the same ``Array`` objects):
  FedMedian, FedTrimmedAvg, Bulyan and QFedAvg pop the arrays out of the records they read
  (``to_numpy_ndarrays(keep_input=False)``, ``pop``), and the round's observers (the audit) read the
  replies after aggregation.

Hyperparameters: a pydantic model generated from the class's own ``__init__`` signature (names, types,
defaults), less the arguments fedsim sets itself (sampling fractions and minimums, record keys,
metric-aggregation callables); ``_BOUNDS`` adds the ranges the algorithms need (Flower checks none of
them at construction). Settings that are the clients' learning rate in Flower's signature (FedOpt's
``eta_l``, QFedAvg's ``client_learning_rate``) are ``train.lr`` in fedsim: set, they must equal it.

The client side is FedAvg's plain local SGD (QFedAvg adds the loss its rule reads: ``strategies.qfedavg``),
so the audit replays it exactly, DP-SGD can privatise it, and every codec and update defense applies.
Flower's DP strategy wrappers need ``FedAvg.aggregate_train``, which none of these keeps
(``StrategySpec.uses_flower_aggregation``): ``dp_user`` refuses them at validation.

Note: FedAdam and QFedAvg return float64 arrays (NumPy 2 promotes the float32 model by a float64 scalar:
FedAdam's bias-corrected ``eta_norm``, q-FedAvg's ``sum_h``), so from round 2 the global model travels,
and is metered, at twice the bytes, as it would under Flower.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from pydantic import BaseModel, ConfigDict, Field, create_model

from .base import ClientAlgorithm, SeededSampling, ServerSettings, StrategySpec, VectorRule, sample_participants
from .fedavg import FedAvgClient
from .rules import RuleViolation

# Arguments of every Flower FedAvg-style class that fedsim sets itself (sampling, record keys, callables).
_SET_BY_FEDSIM = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                  "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
                  "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "selection_rule"}
# The clients' learning rate under another name: train.lr.
CLIENT_LR = {"eta_l", "client_learning_rate"}
# What each algorithm needs of its hyperparameters (Reddi et al. 2021; Hsu et al. 2019; Li et al. 2020;
# Yin et al. 2018; Blanchard et al. 2017; El Mhamdi et al. 2018).
_BOUNDS: dict[str, dict[str, float]] = {
    "eta": {"gt": 0}, "tau": {"gt": 0}, "beta_1": {"ge": 0, "lt": 1}, "beta_2": {"ge": 0, "lt": 1},
    "server_learning_rate": {"gt": 0}, "server_momentum": {"ge": 0, "lt": 1}, "q": {"ge": 0},
    "beta": {"ge": 0, "lt": 0.5}, "num_malicious_nodes": {"ge": 0}, "num_nodes_to_select": {"ge": 1},
}


def flower_params(cls: type) -> type[BaseModel]:
    """The settings model of Flower class ``cls``, from its ``__init__`` signature."""
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__, eval_str=True).parameters.items():
        if name == "self" or name in _SET_BY_FEDSIM or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in CLIENT_LR:  # optional here: train.lr by default
            fields[name] = (float | None, Field(None, gt=0, description="the clients' learning rate: train.lr"))
            continue
        if p.annotation not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{name}: a {p.annotation} setting needs an adapter module")
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__name__}.{name} has no default: it needs an adapter module")
        fields[name] = (p.annotation, Field(p.default, **_BOUNDS.get(name, {})))
    return create_model(f"{cls.__name__}Params", __config__=ConfigDict(extra="forbid"), **fields)


class _OnlyNodes:
    """The grid as the Flower class's ``configure_train`` sees it: only this round's sampled nodes."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _ReadCopy(ArrayRecord):
    """A reply's arrays as the Flower class reads them: the same ``Array`` objects in a record of their own.
    ``to_numpy_ndarrays(keep_input=False)`` (Bulyan, QFedAvg) would empty the record and run ``gc.collect``
    for every reply (0.3 s each in a process holding a data set, 3 s a round of 10 clients); this record is
    dropped after aggregation anyway, so it is read as with ``keep_input=True``: the same arrays, no collection."""

    def to_numpy_ndarrays(self, *, keep_input: bool = True) -> list:
        return super().to_numpy_ndarrays(keep_input=True)

    @classmethod
    def of(cls, record: ArrayRecord) -> "_ReadCopy":
        copy = cls()
        for key, array in record.items():  # item by item: ArrayRecord(dict) would rebuild every Array
            copy[key] = array
        return copy


class SeededFlower(SeededSampling):
    """A Flower strategy class with fedsim's seeded sampling and round config; placed before the Flower
    class in the bases (``flower_strategy``), so ``super()`` past ``SeededSampling`` is Flower's."""

    def __init__(self, settings: ServerSettings, **hyperparameters: Any):
        for name in CLIENT_LR & set(inspect.signature(self._flower().__init__).parameters):
            hyperparameters[name] = hyperparameters.get(name) or settings.lr
        super().__init__(settings, **hyperparameters)
        # Flower's own sampling then takes every node it sees (the seeded choice) and waits for none.
        self.fraction_train, self.min_train_nodes, self.min_available_nodes = 1.0, 1, 1

    @classmethod
    def _flower(cls) -> type:
        return next(c for c in cls.__mro__ if c.__module__.startswith("flwr."))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        s = self.settings
        node_ids = sample_participants(grid.get_node_ids(), server_round, s.seed, s.participation, s.sampling)
        state = random.getstate()  # Flower shuffles the nodes with Python's global generator
        try:
            messages = super(SeededSampling, self).configure_train(
                server_round, arrays, self.round_config(server_round, config), _OnlyNodes(grid, node_ids))
        finally:
            random.setstate(state)
        if type(getattr(self, "current_arrays", None)) is ArrayRecord:  # QFedAvg's copy of the arrays sent,
            self.current_arrays = _ReadCopy.of(self.current_arrays)  # read with keep_input=False: as above
        return sorted(messages, key=lambda m: m.metadata.dst_node_id)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                msg.content = RecordDict({k: _ReadCopy.of(v) if isinstance(v, ArrayRecord) else v
                                          for k, v in msg.content.items()})
        return super().aggregate_train(server_round, replies)


def flower_strategy(cls: type) -> type[SeededFlower]:
    """``SeededFlower`` over Flower class ``cls``, as a class of this module (checkpoints pickle it)."""
    seeded = type(f"Seeded{cls.__name__}", (SeededFlower, cls), {"__module__": __name__})
    globals()[seeded.__name__] = seeded
    return seeded


def _check_client_lr(params: BaseModel, scenario: Any, at: tuple[str, ...]) -> None:
    for name in CLIENT_LR & set(type(params).model_fields):
        value = getattr(params, name)
        if value is not None and value != scenario.train.lr:
            raise RuleViolation((*at, name), f"{name} is the clients' learning rate, train.lr ({scenario.train.lr:g}) "
                                f"in fedsim: leave it out or set train.lr")


def _check_robust(params: BaseModel, scenario: Any, at: tuple[str, ...], bulyan: bool) -> None:
    """Krum needs n > 2f + 2 updates a round, Bulyan n >= 4f + 3 (Flower's Bulyan skips the round
    otherwise); MultiKrum selects at most n. n: the fixed number of clients a round."""
    from .base import fixed_sample_size

    f = params.num_malicious_nodes
    need = 4 * f + 3 if bulyan else 2 * f + 3
    if scenario.train.sampling != "fixed":
        raise RuleViolation(("train", "sampling"), f"{scenario.strategy.name} needs a fixed number of clients per "
                            f"round (at least {need} for num_malicious_nodes {f}): use sampling: fixed")
    n = fixed_sample_size(scenario.data.num_clients, scenario.train.participation)
    if n < need:
        rule = "4f + 3" if bulyan else "2f + 3"
        raise RuleViolation((*at, "num_malicious_nodes"), f"{scenario.strategy.name} with num_malicious_nodes {f} "
                            f"needs at least {rule} = {need} clients a round; the scenario samples {n}")
    if getattr(params, "num_nodes_to_select", 1) > n:
        raise RuleViolation((*at, "num_nodes_to_select"), f"num_nodes_to_select {params.num_nodes_to_select} is more "
                            f"than the {n} clients a round")


def flower_spec(name: str, cls: type, client: Callable[[BaseModel], ClientAlgorithm] = FedAvgClient,
                params: type[BaseModel] | None = None,
                check: Callable[[BaseModel, Any, tuple[str, ...]], None] | None = None) -> StrategySpec:
    """The registered strategy ``name`` for Flower class ``cls`` (FedAvg's client unless ``client``)."""
    seeded = flower_strategy(cls)
    robust = issubclass(cls, (flower.MultiKrum, flower.Bulyan))

    def check_all(p: BaseModel, scenario: Any, at: tuple[str, ...]) -> None:
        _check_client_lr(p, scenario, at)
        if robust:
            _check_robust(p, scenario, at, bulyan=issubclass(cls, flower.Bulyan))
        if check is not None:
            check(p, scenario, at)

    return StrategySpec(name=name, params=params or flower_params(cls),
                        server=lambda p, settings: seeded(settings, **p.model_dump()),
                        client=client, check=check_all,
                        vector_rule=VectorRule if client is FedAvgClient else None)  # plain local SGD


# name -> Flower class; one line each (QFedAvg has its own module: its rule reads a loss the client sends).
FLOWER_CLASSES: dict[str, type] = {
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedadagrad": flower.FedAdagrad,
    "fedavgm": flower.FedAvgM,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
    "multikrum": flower.MultiKrum,
    "bulyan": flower.Bulyan,
}
SPECS: dict[str, StrategySpec] = {name: flower_spec(name, cls) for name, cls in FLOWER_CLASSES.items()}
