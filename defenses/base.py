"""The defense seam: one class per defense, with a server half and a client half.

A defense is one module with a ``Defense`` subclass plus one line in ``defenses.registry``.
It declares, in that module:

- ``Params``: its settings (a pydantic model whose ``name`` is the defense's name);
- ``check(params, scenario)``: the rules it imposes on the rest of the scenario (raise
  ``strategies.rules.RuleViolation`` naming the key to change);
- its server half (this class): ``wrap_server`` (Flower's DP strategy wrappers), the settings it
  adds to every training message (``client_step``, ``train_config``) and to the audit's gradient
  query (``query_config``), ``on_round``/``report``/``summary`` (epsilon, clip fractions ...);
- its client half (``Client``, a ``ClientDefense``), built on the client from the message alone:
  an in-training hook (``private_training``: DP-SGD wraps the ``LocalTrainer``), an update transform
  applied after training and before the codec (``transform``: clip, prune, noise), the same on the
  audit's gradient answer (``private_gradient``, ``transform``), a wrapper of the whole client call
  (``wrap_call``: Flower's clipping mods), and what it means to an attacker (``replay_exact``).

The core (the ClientApp, the audit, the scenario) iterates over the defenses it is given and
never names one. Client-side behaviour follows from what the server sends (as with Flower's own
DP mods, which act on a key in the message config), so the ClientApp needs no scenario copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from flwr.serverapp.strategy import Strategy
from pydantic import BaseModel

Tensors = dict[str, torch.Tensor]

TRANSFORM_STREAM = 10  # of the scenario seed: the update transforms' randomness (fedsim/world lists the others)


def transform_generator(seed: int, server_round: int, partition_id: int, audit: bool = False) -> torch.Generator:
    """The one generator a client's update transforms draw from in a round, in order (its own for the
    audit's gradient answer), keyed by (scenario seed, stream, round, partition id[, audit])."""
    import numpy as np

    key = [seed, TRANSFORM_STREAM, server_round, partition_id, *([1] if audit else [])]
    return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**62)))


@dataclass(frozen=True)
class DefenseSetting:
    """What a defense's server half knows of the run besides its own settings."""
    num_clients: int
    sampled_per_round: int  # clients a round under fixed sampling
    seed: int
    rounds: int = 1


class ClientDefense:
    """A defense's client half, made from its step in the message config (``step``: its settings
    with ``name``; empty for a defense the config activates by a key of its own)."""

    replay_exact: ClassVar[bool] = False  # a replay of plain local SGD reproduces what this client sends

    def __init__(self, step: dict[str, Any]):
        self.step = step

    @classmethod
    def activated_by(cls, config: Any) -> bool:
        """Whether a message whose steps do not list this defense still asks for it (by a key of its own)."""
        return False

    def private_training(self, state: Any) -> Any:
        """The in-training hook: an object that runs the ``LocalTrainer``'s steps privately, or None."""
        return None

    def private_gradient(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: Any,
                         num_examples: int, seed: int) -> Tensors | None:
        """The audit's gradient answer computed as training would compute it under this defense, or None
        (the plain batch gradient)."""
        return None

    @property
    def name(self) -> str:
        return str(self.step["name"])

    def perturbs(self, config: Any) -> bool:
        """Whether what this client sends under ``config`` differs from its clean update (I2F's question)."""
        return True

    def transform(self, update: Tensors, generator: torch.Generator, config: Any) -> tuple[Tensors, dict[str, float]]:
        """The update after training, before the codec, through this defense; metrics of what it did."""
        return update, {}

    def transforms(self) -> bool:
        """Whether this defense transforms the update (a client without one sends its weights untouched)."""
        return type(self).transform is not ClientDefense.transform

    def transform_gradient(self, grads: Tensors, generator: torch.Generator, config: Any) -> Tensors:
        """The audit's gradient answer through this defense, as it would defend an upload (default: ``transform``)."""
        return self.transform(grads, generator, config)[0]

    def wrap_call(self, call: Callable, config: Any) -> Callable:
        """The client's whole train call, wrapped (Flower's clipping mods clip the finished reply)."""
        return call

    def reply_metrics(self, config: Any) -> dict[str, float]:
        """Metrics this defense adds to the reply (Flower's uniform weighting under DP-FedAvg)."""
        return {}


@dataclass(frozen=True)
class UpdateBound:
    """How a defense bounds each client's update in the server's aggregate, for the empirical privacy
    estimate (``fedsim.privacy``: canaries are inserted at this norm): ``norm`` None when it moves every
    round (adaptive clipping), ``delta`` the delta its epsilon is reported at."""

    norm: float | None
    delta: float


class Defense:
    """A defense's server half (see the module docstring); ``Client`` is its client half."""

    name: ClassVar[str] = "?"
    Params: ClassVar[type[BaseModel]]
    Client: ClassVar[type[ClientDefense] | None] = None
    accounts_epsilon: ClassVar[bool] = False  # it reports an epsilon of its own (one such defense a scenario)

    def __init__(self, params: BaseModel, setting: DefenseSetting):
        self.params, self.setting = params, setting

    @classmethod
    def check(cls, params: BaseModel, scenario: Any, at: tuple[str, ...]) -> None:
        """The rules this defense imposes on the rest of the scenario: raise ``RuleViolation`` with the key
        path of the setting to change (``at``: this defense's own block, e.g. ``("defense", "0")``)."""

    @classmethod
    def update_bound(cls, params: BaseModel) -> UpdateBound | None:
        """The L2 bound this defense puts on each client's update as the server aggregates it; None: none."""
        return None

    def wrap_server(self, strategy: Strategy) -> Strategy:
        """The strategy the server runs (default: unchanged)."""
        return strategy

    def client_step(self) -> dict[str, Any] | None:
        """This defense's client-side step (its settings, with ``name``), carried in the message
        config under ``defenses``; None: nothing for the client to do by step."""
        return self.params.model_dump() if self.Client is not None else None

    def on_round(self, record: Any) -> None:
        """Read the round's replies (``fedsim.run.rounds.RoundRecord``) before ``report``."""

    def query_config(self) -> dict[str, Any]:
        """Settings added to the audit's gradient query now (beyond ``train_config``): what the
        client needs to defend its answer as it would defend an upload this round."""
        return {}

    def train_config(self) -> dict[str, Any]:
        """Settings added to every training message's config."""
        return {}

    def report(self) -> dict[str, Any]:
        """This round's privacy figures for metrics.jsonl (epsilon, delta ...)."""
        return {}

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields for summary.json from the run's metrics rows (default: the last round's report)."""
        keys = ("epsilon", "delta", *self.report_keys())
        return {k: rows[-1][k] for k in keys if rows and rows[-1].get(k) is not None}

    def report_keys(self) -> tuple[str, ...]:
        """The keys of ``report`` that summary.json keeps from the last round beside epsilon and delta."""
        return ()
