"""The epsilon lower bound of an audit in one training run: Steinke, Nasr, Jagielski, "Privacy Auditing with
One (1) Training Run" (NeurIPS 2023, arXiv 2305.08846), Theorem 5.2 / their Algorithm for the p-value, as the
paper's appendix states it.

The audit: ``m`` canaries, each included in training independently with probability 1/2; after training the
auditor guesses, for ``r`` of them, whether each was included (abstaining on the rest), and ``v`` guesses are
right. If training is (eps, delta)-DP, the number of right guesses is stochastically dominated, up to a
delta term, by ``Binomial(r, e^eps / (1 + e^eps))`` (randomized response's accuracy):

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1 <= i <= v} P[v > Binomial(r, q) >= v - i] / i

with ``q = e^eps / (1 + e^eps)``. ``p_value`` is that right-hand side; ``epsilon_lower_bound`` is the largest
eps whose p-value is below ``1 - confidence``: training is then not (eps, delta)-DP, at that confidence.
The guesses (``guesses``: the ``k_in`` highest scores called in, the ``k_out`` lowest out) must be fixed
before the audit looks at the outcome; choosing ``k_in``, ``k_out`` after the fact would need a union bound.

This module is the estimator only. fedsim does not insert one-run canaries into a run yet: doing it for
DP-SGD inside clients needs canary samples (or gradient canaries) in the client's Opacus step
(``defenses.dp_sgd``), their inclusion drawn from a seed the server knows, and a server-side score per
canary (docs/privacy.md, "One-run audit").
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, stats


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """The probability of at least ``v`` right guesses out of ``r`` (``m`` canaries) if training is
    (``eps``, ``delta``)-DP: Steinke et al.'s bound (module docstring), capped at 1."""
    if not 0 <= v <= r <= m:
        raise ValueError("need 0 <= v <= r <= m")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError("need eps >= 0 and 0 <= delta <= 1")
    q = 1.0 / (1.0 + math.exp(-eps))  # randomized response's accuracy at eps
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # P[v > Binomial(r, q) >= v - i] for i = 1 .. v, each over i; the largest
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    spread = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * spread, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest eps whose ``p_value`` is at most ``1 - confidence`` (0 when even eps = 0 is not rejected):
    with probability ``confidence``, training was not (eps, delta)-DP for any smaller eps."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    level = 1.0 - confidence

    def excess(eps: float) -> float:  # the p-value grows with eps
        return p_value(m, r, v, eps, delta) - level

    if excess(0.0) >= 0.0:
        return 0.0
    hi = 1.0
    while excess(hi) < 0.0:
        hi *= 2.0
        if hi > 1e3:
            return math.inf
    return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-9))


def guesses(scores: Sequence[float], included: Sequence[bool], k_in: int, k_out: int) -> tuple[int, int]:
    """``(r, v)``: the ``k_in`` highest-scoring canaries guessed included, the ``k_out`` lowest guessed not
    (ties broken by position), and how many of those ``r = k_in + k_out`` guesses ``included`` confirms."""
    s, truth = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if s.shape != truth.shape or k_in < 0 or k_out < 0 or k_in + k_out > s.size:
        raise ValueError("need one score per canary and k_in + k_out <= canaries")
    order = np.argsort(-s, kind="stable")
    right = int(truth[order[:k_in]].sum()) + int((~truth[order[s.size - k_out:]]).sum() if k_out else 0)
    return k_in + k_out, right


__all__ = ["epsilon_lower_bound", "guesses", "p_value"]
