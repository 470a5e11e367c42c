"""``dp_user``: user-level (client-level) DP with fixed clipping, by Flower's own strategy wrappers.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (DP-FedAvg); Flower's ``DifferentialPrivacyClientSideFixedClipping``
(clients clip their update with Flower's ``fixedclipping_mod``) and
``DifferentialPrivacyServerSideFixedClipping`` (the server clips), both adding Gaussian
noise of std ``noise_multiplier * clipping_norm / m`` to the average of the m sampled
updates. Epsilon is Flower's RDP accountant's (``flwr.supercore.privacy_accounting``,
Google's dp-accounting underneath) at ``delta``, without amplification by sampling.

What Flower's accounted wrappers require, checked when the scenario is validated:
the strategy aggregates with Flower's ``FedAvg.aggregate_train`` (fedavg, fedprox), a
fixed number of clients per round, and equal client weights: under ``dp_user`` the
average is uniform (clients report ``uniform-weight`` = 1 and FedAvg weights by it),
as in DP-FedAvg.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Strategy)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from pydantic import BaseModel, ConfigDict, Field

from .base import Defense

UNIFORM_WEIGHT_KEY = "uniform-weight"
NOISE_STREAM = 5  # of the scenario seed (fedsim/world.py lists the others)


class _SeededNoise:
    """Flower's wrappers draw their noise from NumPy's global generator (``np.random.normal``):
    seed it from (scenario seed, round) right before aggregating, so one seed gives one run."""

    seed: int

    def aggregate_train(self, server_round, replies):
        np.random.seed(int(np.random.default_rng([self.seed, NOISE_STREAM, server_round]).integers(2**32)))
        return super().aggregate_train(server_round, replies)


class ClientSideFixedClipping(_SeededNoise, DifferentialPrivacyClientSideFixedClipping):
    pass


class ServerSideFixedClipping(_SeededNoise, DifferentialPrivacyServerSideFixedClipping):
    pass


class DpUserParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dp_user"] = "dp_user"
    clipping: Literal["client", "server"] = Field("client", description="who clips each update")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std / clipping_norm")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")


class FlowerUserDP(Defense):
    def __init__(self, params: DpUserParams, num_clients: int, sampled_per_round: int, seed: int):
        self.params, self.num_clients, self.sampled, self.seed = params, num_clients, sampled_per_round, seed
        self.wrapper: ClientSideFixedClipping | ServerSideFixedClipping | None = None

    def wrap_server(self, strategy: Strategy) -> Strategy:
        p = self.params
        strategy.weighted_by_key = UNIFORM_WEIGHT_KEY
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=p.delta, population_size=self.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        cls = ClientSideFixedClipping if p.clipping == "client" else ServerSideFixedClipping
        self.wrapper = cls(strategy, p.noise_multiplier, p.clipping_norm, self.sampled, accountant=accountant)
        self.wrapper.seed = self.seed
        return self.wrapper

    def train_config(self) -> dict[str, Any]:
        return {UNIFORM_WEIGHT_KEY: True}

    def report(self) -> dict[str, Any]:
        spent = self.wrapper.privacy_spent() if self.wrapper is not None else None
        if spent is None:
            return {}
        return {"epsilon": float(spent.epsilon), "delta": float(spent.delta)}
