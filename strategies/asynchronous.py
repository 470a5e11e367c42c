"""What asynchronous strategies (FedBuff, FedAsync) share: staleness functions, the update they
aggregate, and the server interface the asynchronous loop (``fedsim.run.async_rounds``) drives.

An asynchronous server keeps ``concurrency`` clients training; each client trains from the
global model of the moment it was sent work, and its update reaches the server ``staleness``
server steps later (the number of aggregations in between). The loop hands a strategy its
buffered updates; the strategy's ``aggregate_updates`` is its rule.

Staleness functions (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019, section 5.2;
``a`` and ``b`` as there):
    constant      s(t) = 1
    polynomial    s(t) = (1 + t) ** -a           (FedBuff's 1 / sqrt(1 + t) is a = 0.5)
    hinge         s(t) = 1 if t <= b, else 1 / (a (t - b) + 1)
    invert        s(t) = 1: an update more than ``invert_threshold`` steps old is not down-weighted but
                  converted into a fresh one by gradient inversion (Wang and Gao, "Tackling the Unlimited
                  Staleness in Federated Learning with Intertwined Data and Device Heterogeneities", AAAI
                  2024); the server's side of it is ``fedsim.run.stale_inversion``
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from .base import SeededSampling
from .records import to_record, to_torch
from .rules import RuleViolation


class AsyncParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(10, ge=1, description="clients training at any time (at most data.num_clients)")
    staleness: Literal["constant", "polynomial", "hinge", "invert"] = Field(
        "polynomial", description="s(t), the weight of an update t server steps old; invert: convert an update "
        "older than invert_threshold into a fresh one by gradient inversion (docs/time.md)")
    staleness_a: float = Field(0.5, ge=0, description="polynomial's exponent, hinge's slope")
    staleness_b: int = Field(4, ge=0, description="hinge: the staleness up to which s(t) = 1")
    invert_threshold: int = Field(2, ge=0, description="invert: updates more than this many steps old are inverted")
    invert_attack: str = Field("ig", description="invert: the registered attack (update threat) that estimates the "
                               "client's data from its stale update")
    invert_iterations: int = Field(200, ge=1, description="invert: the attack's budget (optimiser iterations)")
    invert_config: dict[str, Any] = Field(default_factory=dict, description="invert: the attack's other settings")
    invert_time: Literal["wall", "none"] | Annotated[float, Field(ge=0)] = Field(
        "wall", description="invert: the server time an inversion adds to the virtual clock: wall (its measured "
        "wall time), none, or a number (virtual seconds per attack iteration: one seed gives one run)")


def staleness_weight(kind: str, staleness: int, a: float, b: int) -> float:
    """s(t) of Xie et al.: the weight of an update ``staleness`` server steps old."""
    if kind in ("constant", "invert"):  # invert: an old update is made fresh, not down-weighted
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -a)
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


@dataclass
class AsyncUpdate:
    """One buffered update, decoded: the client's model, the global it trained from, its staleness."""

    content: RecordDict   # the decoded reply (its "arrays": the client's model after local training)
    sent: ArrayRecord     # the global arrays it was sent
    staleness: int        # server steps between its dispatch and its aggregation
    num_examples: float
    config: ConfigRecord | None = None  # the training config it was sent (round, seed, lr, ...)
    partition_id: int | None = None

    def delta(self) -> dict[str, torch.Tensor]:
        """Its model update (float entries, in float64): uploaded minus sent."""
        mine, base = to_torch(self.content["arrays"]), to_torch(self.sent)
        return {k: mine[k].double() - base[k].double() for k in base if base[k].is_floating_point()}


def apply_delta(arrays: ArrayRecord, delta: dict[str, torch.Tensor]) -> ArrayRecord:
    """``arrays`` plus ``delta`` on its float entries, in each entry's own dtype (others unchanged)."""
    base = to_torch(arrays)
    return to_record({k: (v.double() + delta[k]).to(v.dtype) if k in delta else v for k, v in base.items()})


class AsyncStrategy(SeededSampling):
    """The server side of an asynchronous strategy: what one dispatch sends, how many completed
    updates one server step aggregates (``buffer_size``), and the rule (``aggregate_updates``)."""

    asynchronous = True

    def __init__(self, settings, params: AsyncParams):
        super().__init__(settings)
        self.params = params

    @property
    def concurrency(self) -> int:
        return self.params.concurrency

    @property
    def buffer_size(self) -> int:
        raise NotImplementedError

    def staleness_weight(self, staleness: int) -> float:
        p = self.params
        return staleness_weight(p.staleness, staleness, p.staleness_a, p.staleness_b)

    def dispatch_record(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """The content of a training message sent while the server is at ``server_round`` - 1 steps."""
        return RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: self.round_config(server_round, config),
                           **self.extra_records(server_round)})

    def aggregate_updates(self, server_step: int, arrays: ArrayRecord,
                          updates: list[AsyncUpdate]) -> tuple[ArrayRecord, dict[str, float]]:
        raise NotImplementedError


def check_async(params: AsyncParams, scenario: Any, at: tuple[str, ...]) -> None:
    """What the asynchronous loop cannot run (``fedsim.run.async_rounds``)."""
    if params.concurrency > scenario.data.num_clients:
        raise RuleViolation((*at, "concurrency"), f"{params.concurrency} clients training at once, but "
                            f"data.num_clients is {scenario.data.num_clients}")
    if scenario.system == "none":
        raise RuleViolation(("system",), f"{scenario.strategy.name} handles completions in virtual-time order: "
                            f"it needs a system section (docs/time.md)")
    if scenario.train.deadline_s is not None:
        raise RuleViolation(("train", "deadline_s"), "an asynchronous strategy waits for no round: no deadline")
    if scenario.privacy != "none":
        raise RuleViolation(("privacy",), "canaries join a synchronous round's aggregate: privacy: none")
    blocks = scenario.defenses()
    for i, block in enumerate(blocks):
        at_block = ("defense", *((str(i),) if len(blocks) > 1 else ()))
        if block.name == "dp_user":  # Flower's DP wrappers are the server's aggregate_train of a round
            raise RuleViolation((*at_block, "name"), "dp_user: Flower's DP wrappers clip and noise the aggregate of "
                                "a synchronous round's fixed cohort and account per round; an asynchronous step "
                                "aggregates a buffer of updates from different models: use clip, noise or dp_sgd")
        if block.name == "dp_sgd" and getattr(block, "target_epsilon", None) is not None:
            raise RuleViolation((*at_block, "target_epsilon"), "dp_sgd calibrates target_epsilon to train.rounds "
                                "trainings per client; an asynchronous client trains as often as it is free (server "
                                "steps bound nothing): give noise_multiplier (each client's accountant counts its steps)")
    if params.staleness == "invert":
        from attacks import ATTACKS
        from attacks.base import check_config

        if params.invert_attack not in ATTACKS or "update" not in ATTACKS[params.invert_attack].threats:
            able = sorted(n for n, a in ATTACKS.items() if "update" in a.threats)
            raise RuleViolation((*at, "invert_attack"), f"{params.invert_attack!r} is no attack on a model update; "
                                f"choose one of {', '.join(able)}")
        if "iterations" in params.invert_config:
            raise RuleViolation((*at, "invert_config", "iterations"), "the budget is invert_iterations")
        known = set(inspect.signature(ATTACKS[params.invert_attack].__init__).parameters) - {"self", "seed", "callback"}
        for key in params.invert_config:
            if key not in known:
                raise RuleViolation((*at, "invert_config", key), f"{params.invert_attack} has no setting {key!r}; "
                                    f"it has {', '.join(sorted(known - {'iterations'}))}")
        try:
            check_config(params.invert_attack, params.invert_config)
        except ValueError as exc:
            raise RuleViolation((*at, "invert_config"), str(exc)) from None
    from .compression import codec_class
    from .compression.codec import Codec, IdentityCodec

    # a codec that decodes each reply alone (the default) works update by update; one that aggregates a
    # round's replies in its own space (a sketch with server momentum) has no round here
    if codec_class(scenario.upload_codec()).decode_round not in (Codec.decode_round, IdentityCodec.decode_round):
        raise RuleViolation(("upload", "codec"), f"{scenario.upload_codec()} decodes a round's replies together; "
                            f"asynchronous updates arrive one by one: use another codec")
