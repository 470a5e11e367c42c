"""The strategy interface: a server Strategy plus a client algorithm (the local update rule).

The server side subclasses Flower's message-based strategies
(``flwr.serverapp.strategy``); ``SeededSampling`` replaces Flower's unseeded node
sampling with a seeded one (fixed fraction, or Bernoulli per client as FL-Simulator
does) and sends each round's training settings in the message config, so the client
trains with exactly what the server asked for (and an auditor knows it).

The client side is a ``ClientAlgorithm``: given the model loaded with the global
weights, its data and the settings, it trains locally and returns metrics plus any
extra records to upload. Persistent client state goes in Flower's ``Context.state``
(a ``RecordDict``), so it works in simulation and deployment alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedsim.records import weighted_mean  # a leaf module: no import cycle

from .sgd import LocalSGD

# Independent RNG streams derived from the one scenario seed.
SAMPLING_STREAM, CLIENT_STREAM = 1, 2


class NoParams(BaseModel):
    """A strategy without hyperparameters."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ServerSettings:
    """What the server strategy needs from the scenario (strategies never import fedsim)."""

    seed: int
    num_clients: int
    participation: float = 1.0
    sampling: str = "fixed"
    lr: float = 0.05
    lr_decay: float = 1.0
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings, as read from the server's message config."""

    server_round: int
    lr: float
    local_epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    seed: int

    @classmethod
    def from_config(cls, config: ConfigRecord, partition_id: int) -> "TrainSettings":
        rnd = int(config["server-round"])
        # Per client and round, independent of which other clients trained.
        seed = int(np.random.default_rng([int(config["seed"]), CLIENT_STREAM, rnd, partition_id]).integers(2**62))
        return cls(rnd, float(config["lr"]), int(config["local-epochs"]), int(config["batch-size"]),
                   float(config["momentum"]), float(config["weight-decay"]), seed)


@dataclass
class ClientData:
    partition_id: int
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(len(self.y))


@dataclass
class TrainResult:
    metrics: dict[str, float]
    records: dict[str, Any] = field(default_factory=dict)  # extra ArrayRecords/MetricRecords to upload


class ClientAlgorithm:
    """Local update rule. Subclasses override ``train``."""

    def __init__(self, params: BaseModel):
        self.params = params

    def train(self, model: nn.Module, data: ClientData, settings: TrainSettings,
              content: RecordDict, state: RecordDict) -> TrainResult:
        raise NotImplementedError


def minibatches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over ``epochs`` seeded passes (last partial batch kept)."""
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def local_sgd(model: nn.Module, data: ClientData, settings: TrainSettings, *,
              extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
              before_step: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
    """Plain local SGD with optional loss term and gradient hook; returns mean loss and steps."""
    # Dropout masks draw from the default CPU generator. (torch.manual_seed would also queue
    # a lazy CUDA seeding that records a stack trace: ~1 ms a call.)
    torch.default_generator.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = LocalSGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                   weight_decay=settings.weight_decay)
    model.train()
    total, steps = 0.0, 0
    for idx in minibatches(data.num_examples, settings.batch_size, settings.local_epochs, gen):
        loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        objective = loss + extra_loss(model) if extra_loss is not None else loss
        opt.zero_grad()
        objective.backward()
        if before_step is not None:
            before_step(model)
        opt.step()
        total += loss.item()
        steps += 1
    return {"train_loss": total / max(steps, 1), "local_steps": float(steps)}


def sample_participants(node_ids: Iterable[int], server_round: int, seed: int,
                        participation: float, sampling: str) -> list[int]:
    """Seeded choice of this round's clients: ``fixed`` count or ``bernoulli`` per client."""
    ids = sorted(node_ids)
    rng = np.random.default_rng([seed, SAMPLING_STREAM, server_round])
    if sampling == "bernoulli":
        chosen = [i for i, u in zip(ids, rng.random(len(ids))) if u < participation]
        return chosen or [ids[int(rng.integers(len(ids)))]]  # never an empty round
    k = max(1, int(round(participation * len(ids))))
    # Choose positions, not ids: real node ids are uint64 and numpy would turn them into floats.
    return sorted(ids[int(i)] for i in rng.choice(len(ids), size=k, replace=False))


class SeededSampling(FlowerFedAvg):
    """Flower FedAvg with seeded sampling and the round's training settings in the config."""

    def __init__(self, settings: ServerSettings, **kwargs: Any):
        super().__init__(fraction_train=settings.participation, fraction_evaluate=0.0,
                         min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=settings.num_clients, **kwargs)
        self.settings = settings

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        s = self.settings
        out = ConfigRecord(dict(config))
        out.update({"server-round": server_round, "lr": s.lr * s.lr_decay ** (server_round - 1),
                    "local-epochs": s.local_epochs, "batch-size": s.batch_size,
                    "momentum": s.momentum, "weight-decay": s.weight_decay, "seed": s.seed})
        return out

    def extra_records(self, server_round: int) -> dict[str, Any]:
        """Records the server sends beside the model (e.g. control variates)."""
        return {}

    def round_report(self, server_round: int) -> dict[str, Any]:
        """Extra JSON-able fields for this round's metrics.jsonl row (e.g. contribution scores)."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        s = self.settings
        node_ids = sample_participants(grid.get_node_ids(), server_round, s.seed, s.participation, s.sampling)
        record = RecordDict({self.arrayrecord_key: arrays,
                             self.configrecord_key: self.round_config(server_round, config),
                             **self.extra_records(server_round)})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's FedAvg.aggregate_train (same checks, same arithmetic) on fedsim.records' decoding."""
        # Reply order decides float summation order: sort for run-to-run identity.
        ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
        valid, _ = self._check_and_log_replies(ordered, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        return weighted_mean(contents, self.weighted_by_key), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: hyperparameter model, server factory, client factory."""

    name: str
    params: type[BaseModel]
    server: Callable[[BaseModel, ServerSettings], FlowerFedAvg]
    client: Callable[[BaseModel], ClientAlgorithm]
