"""Canaries in a fedsim run (the scenario's ``privacy`` section): the server half of the one-shot
estimate of Andrew et al. (ICLR 2024); the estimator itself is ``fedsim.privacy.canaries``.

- ``CanaryStrategy`` wraps the server's strategy *outside* the defenses' wrappers (Flower's accounted
  DP wrappers accept only a plain ``FedAvg`` inside): to the round's released aggregate of the ``m``
  real replies it adds ``norm / m * c_j`` for each canary ``j`` scheduled in the round, i.e. each
  canary counts as one more client of update ``norm * c_j`` (already at the clip norm, as a
  client-side clipper leaves it) under a fixed denominator ``m``. dp_user's noise is additive and
  independent of what it is added to, so ``(avg + canaries) + noise`` and ``(avg + noise) +
  canaries`` are the same Gaussian mechanism: a canary meets exactly the noise std ``z * clip / m``
  the accountant charges a real client. (Appending canary replies to the average instead would be
  refused by Flower's accounted wrappers, which require exactly ``m`` replies, and would divide
  every contribution by ``m + k_t`` under noise calibrated to ``m``, measuring canaries at a noise
  multiplier ``z (m + k_t) / m`` the accountant does not describe.) Canaries never travel: the
  bytes, the clients' training and the audit see only real clients; the model they train from
  carries the canaries' (random, high-dimensional, hence nearly orthogonal) contribution, as in
  the paper. Only fixed clipping: an adaptive norm would change the canaries' scale every round.
- Schedule: each canary is inserted ``repeats`` times; the ``canaries * repeats`` insertions, in a
  seeded shuffled order, are spread evenly over the rounds (the paper's shuffling sampler).
- ``CanaryObserver``: per audited round (every ``every`` rounds and the last), from the canaries
  inserted so far, ``epsilon_est``: the estimate's lower bound at 95% confidence
  (``canaries.epsilon_lower_bound``: with few canaries the paper's point estimate reads far above the
  truth, see ``fedsim.privacy.canaries``), and ``epsilon_est_point``, the point estimate, with its
  bootstrap interval ``epsilon_est_low`` .. ``epsilon_est_high``: ``final``: cosines with the model delta
  since round 0, analytic null ``N(0, 1/d)``; ``all_iterates``: the maximum over rounds of the
  cosine with each round's model delta, the never-inserted canaries as the null.

The vector is every floating-point array of the global ArrayRecord, flattened in record order.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..run.rounds import RoundObserver, RoundRecord
from .canaries import MaxCosines, canary_cosines, canary_sum, estimate_epsilon

SCHEDULE_STREAM = 0xCA9B  # the shuffled insertion order (canary directions use canaries.CANARY_STREAM)


def _float_keys(arrays: ArrayRecord) -> list[str]:
    return [k for k, a in arrays.items() if np.dtype(a.dtype).kind == "f"]


def flat(arrays: ArrayRecord) -> np.ndarray:
    """Every floating-point array of ``arrays``, flattened and concatenated (float64)."""
    keys = _float_keys(arrays)
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(arrays[k].numpy(), dtype=np.float64).ravel() for k in keys])


def added(arrays: ArrayRecord, vector: np.ndarray) -> ArrayRecord:
    """``arrays`` with ``vector`` (in ``flat``'s layout) added to its floating-point arrays."""
    out, at, floats = ArrayRecord(), 0, set(_float_keys(arrays))
    for key, array in arrays.items():
        values = array.numpy()
        if key in floats:
            n = values.size
            values = (values + vector[at:at + n].reshape(values.shape)).astype(values.dtype, copy=False)
            at += n
        out[key] = Array(np.ascontiguousarray(values))
    return out


class CanarySchedule:
    """Which canaries (ids ``0 .. canaries-1``) are inserted in round ``t`` (1-based)."""

    def __init__(self, seed: int, canaries: int, repeats: int, rounds: int):
        rng = np.random.default_rng([int(seed), SCHEDULE_STREAM])
        self.order = np.concatenate([rng.permutation(canaries) for _ in range(repeats)])
        self.rounds = rounds

    def __call__(self, t: int) -> list[int]:
        n, T = len(self.order), self.rounds
        return [int(i) for i in self.order[math.ceil((t - 1) * n / T):math.ceil(t * n / T)]]

    def up_to(self, t: int) -> list[int]:
        """The distinct canaries inserted in rounds ``1 .. t``, sorted."""
        n = len(self.order)
        return sorted({int(i) for i in self.order[:math.ceil(t * n / self.rounds)]})


class CanaryStrategy(Strategy):
    """The server's strategy (the defenses' wrappers included) with the round's canaries added to what it
    releases (see the module docstring). Any other attribute is the wrapped strategy's."""

    def __init__(self, strategy: Strategy, seed: int, schedule: CanarySchedule, norm: float):
        self.strategy = strategy
        self.seed, self.schedule, self.norm = int(seed), schedule, float(norm)
        self.inserted: dict[int, int] = {}  # round -> canaries added

    def __getattr__(self, name: str) -> Any:  # only for what this class does not define
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        ids = self.schedule(server_round)
        m = sum(1 for r in replies if not r.has_error())
        if arrays is None or not ids or m == 0:
            self.inserted[server_round] = 0
            return arrays, metrics
        dim = flat(arrays).size
        self.inserted[server_round] = len(ids)
        return added(arrays, canary_sum(self.seed, ids, dim, scale=self.norm / m)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        return self.strategy.summary()

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class CanaryObserver(RoundObserver):
    """``epsilon_est`` (the lower bound), ``epsilon_est_point`` with ``epsilon_est_low``/``_high`` (its bootstrap
    interval) and ``epsilon_est_canaries`` per audited round."""

    state_key = "privacy-canaries"

    def __init__(self, seed: int, schedule: CanarySchedule, canaries: int, unobserved: int, threat: str,
                 every: int, rounds: int, delta: float, bootstrap: int):
        self.seed, self.schedule, self.canaries, self.unobserved = int(seed), schedule, canaries, unobserved
        self.threat, self.every, self.rounds, self.delta, self.bootstrap = threat, every, rounds, delta, bootstrap
        self.theta0: np.ndarray | None = None
        self.tracker = MaxCosines(self.seed, canaries, unobserved) if threat == "all_iterates" else None
        self.last: dict[str, Any] = {}

    def state_dict(self) -> dict:
        return {"theta0": self.theta0, "tracker": self.tracker, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.theta0, self.tracker, self.last = state["theta0"], state["tracker"], state["last"]

    def on_start(self, arrays: ArrayRecord) -> None:
        self.theta0 = flat(arrays)

    def on_round(self, record: RoundRecord) -> None:
        t = record.server_round
        now = flat(record.arrays)
        if self.tracker is not None:
            self.tracker.update(now - flat(record.arrays_sent))
        if t % self.every and t != self.rounds:
            return
        seen = self.schedule.up_to(t)
        if len(seen) < 2:
            return
        if self.tracker is not None:
            est = estimate_epsilon(self.tracker.observed[seen], self.delta, null=self.tracker.unobserved,
                                   bootstrap=self.bootstrap, seed=self.seed + t)
        else:
            cos = canary_cosines(now - self.theta0, self.seed, seen)
            est = estimate_epsilon(cos, self.delta, dim=now.size, bootstrap=self.bootstrap, seed=self.seed + t)
        self.last = {"epsilon_est": _num(est.lower), "epsilon_est_point": _num(est.epsilon),
                     "epsilon_est_low": _num(est.low),
                     "epsilon_est_high": _num(est.high), "epsilon_est_canaries": len(seen)}
        record.row.update(self.last)

    def summary(self) -> dict[str, Any]:
        return {**self.last, "epsilon_est_threat": self.threat, "epsilon_est_delta": self.delta} if self.last else {}


def _num(x: float) -> float | None:
    """JSON has no inf or nan: an unbounded estimate or end is written as None."""
    return float(x) if math.isfinite(x) else None


def update_bound(scenario: Any):
    """The first defense's bound on each client's update (``defenses.base.Defense.update_bound``), or None."""
    from defenses import DEFENSES

    return next((b for block in scenario.defenses() if (b := DEFENSES[block.name].update_bound(block)) is not None),
                None)


class CanaryRun:
    """The privacy section's server objects: ``wrap`` (the strategy, after the defenses wrapped it) and
    ``observer``."""

    def __init__(self, scenario: Any, rounds: int):
        p = scenario.privacy
        bound = update_bound(scenario)  # the defense that clips each update, if any (dp_user's wrappers)
        self.norm = p.norm if p.norm is not None else (bound.norm if bound is not None else 1.0)
        self.delta = p.delta if p.delta is not None else (bound.delta if bound is not None else 1e-5)
        self.seed = int(scenario.seed)
        unobserved = p.unobserved if p.unobserved is not None else p.canaries
        self.schedule = CanarySchedule(self.seed, p.canaries, p.repeats, rounds)
        self.observer = CanaryObserver(self.seed, self.schedule, p.canaries, unobserved, p.threat, p.every, rounds,
                                       self.delta, p.bootstrap)

    def wrap(self, strategy: Strategy) -> CanaryStrategy:
        return CanaryStrategy(strategy, self.seed, self.schedule, self.norm)

    def summary(self) -> dict[str, Any]:
        return self.observer.summary()
