"""The strategy interface: a server Strategy plus a client algorithm (the local update rule).

The server side subclasses Flower's message-based strategies
(``flwr.serverapp.strategy``); ``SeededSampling`` replaces Flower's unseeded node
sampling with a seeded one (fixed fraction, or Bernoulli per client as FL-Simulator
does) and sends every setting a client uses in the message config (``client_config``:
training settings, the strategy's name and hyperparameters, the upload codec), so the
client trains with exactly what the server asked for, and an auditor knows it. The
client never reads its own copy of the scenario for a setting.

fedavg and fedprox keep Flower's own ``FedAvg.aggregate_train``, so Flower's DP strategy
wrappers (which insist on it) compose with them; strategies with their own rule derive
from ``strategies.stateful.DeltaStrategy``.

The client side is a ``ClientAlgorithm``: given a ``ClientJob`` (the model loaded with
the global weights, its data, the settings, the message, ``Context.state``) it trains
with the ``LocalTrainer`` and returns an ``Upload``. Persistent client state goes in
Flower's ``Context.state`` (a ``RecordDict``), so it works in simulation and deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from pydantic import BaseModel, ConfigDict
from torch import nn

from .compression import codec_seed
from .settings import TrainConfig
from .trainer import ClientData, LocalTrainer, TrainSettings
from .upload import Upload

# Independent RNG stream of the one scenario seed for client sampling (trainer.CLIENT_STREAM: local training).
SAMPLING_STREAM = 1


class NoParams(BaseModel):
    """A strategy without hyperparameters."""

    model_config = ConfigDict(extra="forbid")


class ServerSettings(TrainConfig):
    """What the server strategy needs from the scenario (strategies never import fedsim): the training
    settings as the scenario declares them, plus who trains and with which strategy and codec."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int
    num_clients: int
    strategy: str = "fedavg"
    strategy_params: str = "{}"  # the hyperparameters as JSON, as the client reads them back
    codec: str = "none"
    codec_params: str = "{}"  # the codec's settings as JSON (strategies.compression.codec_params)


def client_config(s: ServerSettings, server_round: int) -> dict[str, Any]:
    """Every setting a client uses in round ``server_round``: the one format, written here only.

    Read back by ``TrainSettings.from_config`` and ``ClientJob`` (``fedsim.run.apps``)."""
    return {"server-round": server_round, "lr": s.lr * s.lr_decay ** (server_round - 1),
            "local-epochs": s.local_epochs, "batch-size": s.batch_size, "momentum": s.momentum,
            "weight-decay": s.weight_decay, "seed": s.seed, "strategy": s.strategy,
            "strategy-params": s.strategy_params, "codec": s.codec, "codec-params": s.codec_params,
            "codec-seed": codec_seed(s.seed)}


@dataclass
class ClientJob:
    """Everything one client's training call gets: model (global weights loaded), data, settings,
    the message content (extra records from the server) and the node's persistent state."""

    model: nn.Module
    data: ClientData
    settings: TrainSettings
    content: RecordDict
    state: RecordDict
    sent: dict[str, torch.Tensor] = field(default_factory=dict)  # the global state dict, as received
    private: Any = None  # DP-SGD for this round (defenses.dp_sgd.PrivateTraining), as the message asks

    @property
    def device(self) -> torch.device:
        """Where this client computes (its data and model are there; records load there)."""
        return self.data.x.device

    def trainer(self) -> LocalTrainer:
        return LocalTrainer(self.model, self.data, self.settings, private=self.private)

    def upload(self, trainer: LocalTrainer, metrics: dict[str, float] | None = None,
               extras: dict[str, Any] | None = None) -> Upload:
        """The model as it is now, with the trainer's metrics (or ``metrics``) and schedule."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return Upload(weights, self.sent, trainer.metrics() if metrics is None else metrics,
                      extras or {}, trainer.schedule)


class ClientAlgorithm:
    """Local update rule. Subclasses override ``train``."""

    def __init__(self, params: BaseModel):
        self.params = params

    def train(self, job: ClientJob) -> Upload:
        raise NotImplementedError


class VectorRule:
    """A client algorithm's local rule on many clients at once (``engine.name: vectorized``).

    The engine (``fedsim.engines.vectorized``) holds a chunk of a round's clients with their parameters
    stacked along dim 0 (the client axis), draws each client's batches from its own seeded sampler and
    runs the SGD step (masked: a client past its last step does not move). A rule says only what its
    ``ClientAlgorithm`` adds to plain local SGD on cross-entropy, so that every client runs exactly the
    step it runs on the inline engine. This base class is FedAvg's rule: nothing added.
    """

    def __init__(self, params: BaseModel):
        self.params = params

    @classmethod
    def unsupported(cls, params: BaseModel) -> str:
        """Why these hyperparameters cannot train vectorised ("" when they can): a validation refusal."""
        return ""

    def start(self, jobs: list[ClientJob], weights: dict[str, torch.Tensor]) -> None:
        """Before the first step: ``jobs`` the chunk's clients (``job.model`` is only the template),
        ``weights`` the parameters as sent, stacked (read only)."""

    def extra_loss(self, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each client's term added to its training objective (shape [clients]; not to its reported
        loss), differentiable in ``weights``; None for none."""
        return None

    def gradients(self, loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                  weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's (each client's data loss [clients], detached; the stacked gradients of its objective).
        ``loss_of(params)``: the step's batch loss of every client at stacked ``params``, differentiable.
        Default: the gradient of loss + ``extra_loss`` at ``weights``; a rule that takes more than one
        gradient a step (FedSpeed's SAM) overrides it."""
        params = {k: w.detach().requires_grad_() for k, w in weights.items()}
        loss = loss_of(params)
        extra = self.extra_loss(params)
        objective = loss if extra is None else loss + extra
        grads = torch.autograd.grad(objective.sum(), list(params.values()))
        return loss.detach(), dict(zip(params, grads))

    def before_step(self, grads: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stacked gradients as the SGD step should see them (before weight decay and momentum);
        ``weights`` the stacked parameters the step starts from (read only)."""
        return grads

    def finish(self, jobs: list[ClientJob], weights: dict[str, torch.Tensor], steps: list[int]) -> list[dict[str, Any]]:
        """After the last step (``weights`` trained, ``steps`` each client's step count): each client's
        extra upload records, its ``Context.state`` (``job.state``) written as its algorithm writes it.
        A rule whose client uploads something other than its trained weights replaces entries of
        ``weights`` (new tensors: the trained ones may be shared)."""
        return [{} for _ in jobs]

    def metrics(self, i: int) -> dict[str, float]:
        """What client ``i``'s algorithm adds to its reported metrics (after ``finish``)."""
        return {}


def fixed_sample_size(num_clients: int, participation: float) -> int:
    """Clients per round under ``fixed`` sampling."""
    return max(1, int(round(participation * num_clients)))


def sample_participants(node_ids: Iterable[int], server_round: int, seed: int,
                        participation: float, sampling: str) -> list[int]:
    """Seeded choice of this round's clients: ``fixed`` count or ``bernoulli`` per client."""
    ids = sorted(node_ids)
    rng = np.random.default_rng([seed, SAMPLING_STREAM, server_round])
    if sampling == "bernoulli":
        chosen = [i for i, u in zip(ids, rng.random(len(ids))) if u < participation]
        return chosen or [ids[int(rng.integers(len(ids)))]]  # never an empty round
    k = fixed_sample_size(len(ids), participation)
    # Choose positions, not ids: real node ids are uint64 and numpy would turn them into floats.
    return sorted(ids[int(i)] for i in rng.choice(len(ids), size=k, replace=False))


class SeededSampling(FlowerFedAvg):
    """Flower FedAvg with seeded sampling and every client setting in the config."""

    def __init__(self, settings: ServerSettings, **kwargs: Any):
        super().__init__(fraction_train=settings.participation, fraction_evaluate=0.0,
                         min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=settings.num_clients, **kwargs)
        self.settings = settings

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out.update(client_config(self.settings, server_round))
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


@dataclass(frozen=True)
class UploadView:
    """What a client's upload means to an attacker who sees only what the server saw.

    ``update`` is the uploaded weights minus the weights sent (by parameter name).
    ``exact`` says whether plain local SGD from the sent weights, with the sent settings,
    reproduces it (so an attack that replays local SGD models the client exactly); when not,
    ``note`` says what the replay leaves out.
    """

    update: dict[str, np.ndarray]
    exact: bool
    note: str = ""


def model_delta(sent: dict[str, np.ndarray], reply: RecordDict) -> dict[str, np.ndarray]:
    uploaded = {k: v.numpy() for k, v in reply["arrays"].items()}
    return {k: uploaded[k].astype(np.float64) - v.astype(np.float64) for k, v in sent.items()
            if np.issubdtype(v.dtype, np.floating)}


def local_sgd_view(sent: dict[str, np.ndarray], reply: RecordDict, params: BaseModel) -> UploadView:
    """FedAvg's meaning: the upload is the model after plain local SGD."""
    return UploadView(model_delta(sent, reply), exact=True)


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: hyperparameter model, server factory, client factory, and what its
    upload means to an attacker (``observe``; default: the model after plain local SGD)."""

    name: str
    params: type[BaseModel]
    server: Callable[[BaseModel, ServerSettings], FlowerFedAvg]
    client: Callable[[BaseModel], ClientAlgorithm]
    observe: Callable[[dict[str, np.ndarray], RecordDict, BaseModel], UploadView] = local_sgd_view
    # Whether its local step is the trainer's plain ``run`` (one loss, one gradient a step), which an
    # in-training defense can privatise per sample (DP-SGD); False for steps with extra gradients.
    plain_local_step: bool = True
    # The rules it imposes on the rest of the scenario (raises strategies.rules.RuleViolation), as codecs
    # and defenses state theirs: (params, scenario, key path of the strategy block).
    check: Callable[[BaseModel, Any, tuple[str, ...]], None] | None = None
    # Its local rule for clients trained together (``engine.name: vectorized``); None: that engine refuses it.
    vector_rule: type[VectorRule] | None = None

    def uses_flower_aggregation(self) -> bool:
        """Whether the server aggregates with Flower's own ``FedAvg.aggregate_train`` (what Flower's
        DP strategy wrappers and their accountant require), judged on one built with default settings."""
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # Flower's FedAvg warns about fraction_evaluate 0 on construction
        try:
            strategy = self.server(self.params(), ServerSettings(seed=0, num_clients=1))
        finally:
            flwr_log.setLevel(level)
        return isinstance(strategy, FlowerFedAvg) and type(strategy).aggregate_train is FlowerFedAvg.aggregate_train
