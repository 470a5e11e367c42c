"""The one-run audit's epsilon lower bound (fedsim.privacy.one_run; Steinke, Nasr, Jagielski, NeurIPS 2023) where
the truth is known: randomized response at epsilon, the mechanism the bound is tight for."""

import math

import numpy as np
import pytest

from fedsim.privacy.one_run import epsilon_lower_bound, guesses, p_value


def _randomized_response(eps: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each canary included with probability 1/2; the output reports inclusion truthfully with probability
    e^eps / (1 + e^eps): eps-DP in each canary."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
    return included, np.where(truthful, included, ~included)


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_bound_stays_under_the_truth_and_approaches_it_with_signal(eps):
    """Guessing what randomized response reported, for every canary: v ~ Binomial(m, e^eps / (1 + e^eps)), the
    worst case the bound allows, so at 95% confidence it exceeds eps in at most 5% of runs."""
    bounds = {}
    for m in (200, 5_000):
        bounds[m] = []
        for seed in range(100):
            included, said = _randomized_response(eps, m, seed)
            r, v = guesses(said.astype(float), included, int(said.sum()), int((~said).sum()))  # guess what it said
            bounds[m].append(epsilon_lower_bound(m, r, v))
    # tight for randomized response: above the truth in 5% of runs at most (plus the sampling error of 100 runs)
    assert np.mean(np.array(bounds[200]) > eps) <= 0.09 and np.mean(np.array(bounds[5_000]) > eps) <= 0.09
    assert np.mean(bounds[5_000]) > 0.88 * eps > np.mean(bounds[200])  # more canaries: tighter


def test_p_value_is_the_binomial_tail_at_delta_zero_and_grows_with_delta_and_epsilon():
    from scipy import stats

    assert p_value(100, 100, 70, 1.0) == pytest.approx(stats.binom.sf(69, 100, 1 / (1 + math.exp(-1.0))))
    assert p_value(100, 100, 70, 1.0, 1e-4) > p_value(100, 100, 70, 1.0)
    assert p_value(100, 100, 70, 0.5) < p_value(100, 100, 70, 1.0)
    # a delta spends confidence: the bound at delta > 0 is lower
    assert epsilon_lower_bound(1000, 1000, 800, 1e-5) < epsilon_lower_bound(1000, 1000, 800)


def test_chance_guessing_proves_nothing_and_bounds_are_consistent():
    assert epsilon_lower_bound(1000, 1000, 500) == 0.0
    eps = epsilon_lower_bound(1000, 1000, 800)
    assert p_value(1000, 1000, 800, eps) == pytest.approx(0.05, abs=1e-6)  # the largest eps rejected at 95%
    assert 5 < epsilon_lower_bound(10_000, 10_000, 10_000) < 20  # every guess right: large, finite
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0)


def test_guesses_count_the_highest_in_and_the_lowest_out():
    scores, included = [5.0, 4.0, 3.0, 2.0, 1.0], [True, False, True, False, False]
    assert guesses(scores, included, 2, 2) == (4, 3)  # in: 5 (right), 4 (wrong); out: 2, 1 (both right)
    assert guesses(scores, included, 0, 0) == (0, 0)
