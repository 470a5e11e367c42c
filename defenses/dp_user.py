"""``dp_user``: user-level (client-level) DP with fixed or adaptive clipping, by Flower's own wrappers.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (DP-FedAvg); Flower's ``DifferentialPrivacyClientSideFixedClipping``
(clients clip their update with Flower's ``fixedclipping_mod``) and
``DifferentialPrivacyServerSideFixedClipping`` (the server clips), both adding Gaussian
noise of std ``noise_multiplier * clipping_norm / m`` to the average of the m sampled
updates. Epsilon is Flower's RDP accountant's (``flwr.supercore.privacy_accounting``,
Google's dp-accounting underneath) at ``delta``, without amplification by sampling.

``adaptive: true``: Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021, by Flower's ``DifferentialPrivacyClientSideAdaptiveClipping``
(clients clip with Flower's ``adaptiveclipping_mod`` and report whether they were clipped) or
``DifferentialPrivacyServerSideAdaptiveClipping``. ``clipping_norm`` is the initial norm; each
round it moves geometrically (rate ``clip_norm_lr``) towards the ``target_unclipped_quantile`` of
update norms (the paper's gamma: the fraction of updates left unclipped; see ``_PaperUpdate`` for the
direction Flower 1.41 gets wrong), estimated from a noisy count (std ``clipped_count_stddev``, default m/20). Flower
splits ``noise_multiplier`` between the count and the update so that the pair is as private as
one Gaussian mechanism of ``noise_multiplier`` (the paper's section 3.2); epsilon is therefore
Flower's RDP accountant composed with that mechanism every round (Flower's adaptive wrappers take
no accountant of their own).

What Flower's accounted wrappers require, checked when the scenario is validated:
the strategy aggregates with Flower's ``FedAvg.aggregate_train`` (fedavg, fedprox), a
fixed number of clients per round, and equal client weights: under ``dp_user`` the
average is uniform (clients report ``uniform-weight`` = 1 and FedAvg weights by it),
as in DP-FedAvg.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Strategy)
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .base import ClientDefense, Defense, DefenseSetting, UpdateBound

UNIFORM_WEIGHT_KEY = "uniform-weight"
ADAPTIVE_KEY = "dp-user-adaptive"  # tells the client to answer with Flower's adaptiveclipping_mod
QUERY_CLIP_KEY = "dp-user-clipping-norm"  # the audit's gradient query: clip the answer as the mod clips an update
NOISE_STREAM = 5  # of the scenario seed (fedsim/world/build.py lists the others)


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


class _PaperUpdate:
    """Andrew et al.'s norm update, C <- C exp(-lr (b - gamma)), with b the (noisy) fraction of updates
    *not* clipped (their b_i = 1 iff ||update_i|| <= C) and gamma the quantile of update norms C tracks.

    Flower 1.41's wrappers pass their noisy fraction of *clipped* updates (``norm_bit`` is
    ``scaling_factor < 1``) as b: the norm then shrinks when every update is clipped and grows when
    none is, away from the quantile. Given 1 - (clipped fraction) the rule is the paper's; the
    count's noise is unchanged (a clipped count of c +- s is an unclipped count of m - c -+ s)."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(-self.clip_norm_lr * ((1.0 - clipped_fraction) - self.target_clipped_quantile))


class ClientSideAdaptiveClipping(_SeededNoise, _PaperUpdate, DifferentialPrivacyClientSideAdaptiveClipping):
    pass  # the seeded global generator covers both of its draws: the count's noise and the update's


class ServerSideAdaptiveClipping(_SeededNoise, _PaperUpdate, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class DpUserParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dp_user"] = "dp_user"
    clipping: Literal["client", "server"] = Field("client", description="who clips each update")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std / clipping_norm")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update (adaptive: initial)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")
    adaptive: bool = Field(False, description="adaptive clipping (Andrew et al. 2021)")
    target_unclipped_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: the quantile of update "
                                             "norms the norm tracks: the fraction of updates left unclipped "
                                             "(the paper's gamma)")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive: geometric learning rate of the norm")
    clipped_count_stddev: float | None = Field(None, ge=0, description="adaptive: count noise std (default m/20)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        """Flower calls its setting ``target_clipped_quantile`` and documents it as the quantile "which should
        be clipped", while the rule (Andrew et al.'s gamma) tracks the fraction left unclipped: at 0.8 a Flower
        user would get the opposite of what they meant. fedsim's name says what it does."""
        if isinstance(data, dict) and "target_clipped_quantile" in data:
            raise ValueError("target_clipped_quantile is now target_unclipped_quantile: the fraction of updates "
                             "left unclipped (Andrew et al.'s gamma; Flower's name reads as its complement)")
        return data

    @model_validator(mode="after")
    def _adaptive_only(self) -> "DpUserParams":
        if not self.adaptive and self.clipped_count_stddev is not None:
            raise ValueError("clipped_count_stddev applies only with adaptive: true")
        return self


def adaptive_refusal(p: DpUserParams, sampled: int) -> str | None:
    """Flower's reason for refusing these adaptive settings with ``sampled`` clients a round, or None."""
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    try:
        compute_adaptive_noise_params(p.noise_multiplier, sampled, p.clipped_count_stddev)
    except ValueError as exc:
        return str(exc).splitlines()[0]
    return None


class FlowerClientClipping(ClientDefense):
    """The client half: Flower's own client-side clipping mod, asked for by the key Flower's client-side
    wrapper puts in the config; the audit's gradient answer clipped alike, last (the mod clips the
    finished reply); and the uniform weight the server averages by."""

    replay_exact = True  # the audit's notes have always left Flower's clipping out of "the replay leaves out"

    @classmethod
    def activated_by(cls, config) -> bool:
        return any(k in config for k in (UNIFORM_WEIGHT_KEY, KEY_CLIPPING_NORM, QUERY_CLIP_KEY))

    def perturbs(self, config) -> bool:
        return KEY_CLIPPING_NORM in config

    def wrap_call(self, call, config):
        if KEY_CLIPPING_NORM not in config:
            return call  # server-side clipping: the client sends its update as trained
        from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

        mod = adaptiveclipping_mod if config.get(ADAPTIVE_KEY) else fixedclipping_mod
        return lambda msg, context: mod(msg, context, call)

    def transform_gradient(self, grads, generator, config):
        if QUERY_CLIP_KEY not in config:
            return grads
        from .clip import clip

        return clip(grads, float(config[QUERY_CLIP_KEY]))[0]

    def reply_metrics(self, config) -> dict[str, float]:
        return {UNIFORM_WEIGHT_KEY: 1.0} if config.get(UNIFORM_WEIGHT_KEY) else {}


class FlowerUserDP(Defense):
    name = "dp_user"
    Params = DpUserParams
    Client = FlowerClientClipping
    accounts_epsilon = True

    def __init__(self, params: DpUserParams, setting: DefenseSetting):
        super().__init__(params, setting)
        self.num_clients, self.sampled, self.seed = setting.num_clients, setting.sampled_per_round, setting.seed
        self.wrapper: ClientSideFixedClipping | ServerSideFixedClipping | None = None

    @classmethod
    def check(cls, params: DpUserParams, scenario: Any, at: tuple[str, ...]) -> None:
        """Flower's accounted wrappers need FedAvg's own aggregation and a fixed sample size; client-side
        clipping clips the reply's ``arrays``, which an upload codec replaces."""
        from strategies import get_strategy, strategy_names
        from strategies.base import fixed_sample_size
        from strategies.rules import RuleViolation

        if params.clipping == "client" and scenario.upload_codec() != "none":
            raise RuleViolation(("upload", "codec"), "dp_user with clipping: client clips the uncompressed reply "
                                "(Flower's fixedclipping_mod); use clipping: server with an upload codec")
        strategy = scenario.strategy.name
        if not get_strategy(strategy).uses_flower_aggregation():
            fedavg_like = ", ".join(n for n in strategy_names() if get_strategy(n).uses_flower_aggregation())
            raise RuleViolation((*at, "name"), f"dp_user (Flower's DP strategy wrapper) needs a strategy that "
                                f"aggregates with Flower's FedAvg.aggregate_train ({fedavg_like}); {strategy} "
                                f"has its own rule")
        if scenario.train.sampling != "fixed":
            raise RuleViolation(("train", "sampling"), "dp_user's accountant needs a fixed number of clients "
                                "per round: use sampling: fixed")
        if getattr(scenario.train, "deadline_s", None) is not None:  # docs/time.md
            raise RuleViolation(("train", "deadline_s"), "dp_user's accountant needs a fixed number of replies per "
                                "round, which a deadline that drops stragglers does not keep: no deadline with dp_user")
        if params.adaptive:
            reason = adaptive_refusal(params, fixed_sample_size(scenario.data.num_clients,
                                                                scenario.train.participation))
            if reason:
                raise RuleViolation((*at, "noise_multiplier"), reason)

    @classmethod
    def update_bound(cls, params: DpUserParams) -> UpdateBound:
        """Flower's wrappers clip every update to ``clipping_norm`` (adaptive: a norm that moves each round)."""
        return UpdateBound(None if params.adaptive else params.clipping_norm, params.delta)

    def client_step(self) -> None:
        return None  # the client half acts on the keys Flower's wrappers and train_config put in the config

    def wrap_server(self, strategy: Strategy) -> Strategy:
        p = self.params
        strategy.weighted_by_key = UNIFORM_WEIGHT_KEY
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=p.delta, population_size=self.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        if p.adaptive:
            cls = ClientSideAdaptiveClipping if p.clipping == "client" else ServerSideAdaptiveClipping
            self.wrapper = cls(strategy, p.noise_multiplier, self.sampled, initial_clipping_norm=p.clipping_norm,
                               target_clipped_quantile=p.target_unclipped_quantile, clip_norm_lr=p.clip_norm_lr,
                               clipped_count_stddev=p.clipped_count_stddev)
        else:
            cls = ClientSideFixedClipping if p.clipping == "client" else ServerSideFixedClipping
            self.wrapper = cls(strategy, p.noise_multiplier, p.clipping_norm, self.sampled, accountant=self.accountant)
        self.wrapper.seed = self.seed
        return self.wrapper

    def train_config(self) -> dict[str, Any]:
        return {UNIFORM_WEIGHT_KEY: True, **({ADAPTIVE_KEY: True} if self.params.adaptive else {})}

    def query_config(self) -> dict[str, Any]:
        """Client-side clipping clips whatever the client sends, the audit's gradient answer too, at the
        norm of this round (adaptive: the wrapper's current one). Server-side clipping and the noise
        happen at the server, after an honest-but-curious server has seen the reply: nothing to add."""
        if self.params.clipping != "client" or self.wrapper is None:
            return {}
        return {QUERY_CLIP_KEY: float(self.wrapper.clipping_norm)}

    def on_round(self, record) -> None:
        if self.params.adaptive and record.replies:  # one noisy average released this round
            self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=self.params.noise_multiplier,
                                                         sample_size=self.sampled, population_size=self.num_clients))

    def report(self) -> dict[str, Any]:
        if self.wrapper is None:
            return {}
        if self.params.adaptive:
            spent = self.accountant.get_privacy_spent() if self.accountant.num_releases else None
            out = {"clipping_norm": float(self.wrapper.clipping_norm)}  # the norm the next round clips at
        else:
            spent, out = self.wrapper.privacy_spent(), {}
        if spent is None:
            return out
        return {**out, "epsilon": float(spent.epsilon), "delta": float(spent.delta)}

