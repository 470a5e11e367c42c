"""The one-shot canary estimator (fedsim.privacy.canaries) where the truth is known.

Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024): on the
Gaussian mechanism in high dimension -- the sum of k canaries of norm C plus N(0, (z C)^2 I), no
model -- the cosines of inserted canaries with the output, against N(0, 1/d), give back the epsilon
of the Gaussian mechanism with noise multiplier z. The truth is dp-accounting's PLD accountant
(Flower's accountant wraps the same library).

Run with ``-s`` to see the estimate-vs-truth table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.privacy.canaries import (MaxCosines, canary_cosines, canary_direction, canary_sum, delta_two_gaussians,
                                     epsilon_from_statistics, epsilon_lower_bound, epsilon_two_gaussians,
                                     estimate_epsilon)

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402

DIM = 50_000
CANARIES = 1_000          # observed; as many unobserved
CLIP = 3.0                # canary norm C (cosines must not depend on it)
NOISE = (0.5, 1.0, 2.0)   # noise multipliers z; 0.0 is "no defense"
DELTA = 1e-5
SEEDS = range(5)


def true_epsilon(z: float, delta: float = DELTA) -> float:
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return acc.get_epsilon(delta)


def _gaussian_mechanism(seed: int) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per noise multiplier: (cosines of the inserted canaries, of the never-inserted ones) with the output
    sum_j C c_j + N(0, (z C)^2 I); one noise draw per seed, scaled per z (canaries regenerated, not stored)."""
    total = canary_sum(seed, range(CANARIES), DIM, scale=CLIP)
    noise = np.random.default_rng([seed, 1, 2, 3]).standard_normal(DIM)  # a key no canary uses
    levels = (*NOISE, 0.0)
    outputs = np.stack([total + z * CLIP * noise for z in levels])
    seen = canary_cosines(outputs, seed, range(CANARIES))
    unseen = canary_cosines(outputs, seed, range(CANARIES, 2 * CANARIES))
    return {z: (seen[i], unseen[i]) for i, z in enumerate(levels)}


@pytest.fixture(scope="module")
def runs():
    import torch
    torch.set_num_threads(1)
    return {seed: _gaussian_mechanism(seed) for seed in SEEDS}


# ------------------------------------------------------------------ the privacy curve of two Gaussians

@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_two_gaussians_equal_variance_is_the_gaussian_mechanism(z, delta):
    truth = true_epsilon(z, delta)
    assert epsilon_two_gaussians(0.0, z, 1.0, z, delta) == pytest.approx(truth, rel=1e-6)
    # invariant to shift, scale and order
    assert epsilon_two_gaussians(5.0, 3 * z, 2.0, 3 * z, delta) == pytest.approx(truth, rel=1e-6)
    assert epsilon_two_gaussians(1.0, 1.0, 0.0, 1.0, delta) == pytest.approx(true_epsilon(1.0, delta), rel=1e-6)


@pytest.mark.parametrize("mu0,sd0,mu1,sd1,delta", [(0, 1, 1, 1.3, 1e-2), (0, 1, 2, 0.7, 1e-2), (1, 2, 0, 1, 0.1)])
def test_two_gaussians_unequal_variance_monte_carlo(mu0, sd0, mu1, sd1, delta):
    """At the epsilon returned, the larger hockey-stick divergence (by Monte Carlo) is delta."""
    from scipy.stats import norm
    eps = epsilon_two_gaussians(mu0, sd0, mu1, sd1, delta)
    assert delta_two_gaussians(mu0, sd0, mu1, sd1, eps) == pytest.approx(delta, rel=1e-6)
    rng = np.random.default_rng(0)

    def hockey_stick(ma, sa, mb, sb):
        y = rng.normal(ma, sa, 400_000)
        loss = norm.logpdf(y, ma, sa) - norm.logpdf(y, mb, sb)
        return float(np.mean(np.maximum(0.0, 1.0 - np.exp(eps - loss))))

    assert max(hockey_stick(mu0, sd0, mu1, sd1), hockey_stick(mu1, sd1, mu0, sd0)) == pytest.approx(delta, rel=0.05)


def test_two_gaussians_edges():
    assert epsilon_two_gaussians(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0
    assert epsilon_two_gaussians(0.0, 1.0, 1e-6, 1.0, 1e-5) == 0.0  # total variation < delta
    assert math.isinf(epsilon_two_gaussians(0.0, 1.0, 1.0, 0.0, 1e-5))
    assert epsilon_two_gaussians(0.0, 1.0, 100.0, 1.0, 1e-5) > 1000  # far apart: huge, finite
    with pytest.raises(ValueError):
        epsilon_two_gaussians(0.0, 1.0, 1.0, 1.0, 0.0)


# ------------------------------------------------------------------ canaries

def test_canary_directions_are_reproducible_unit_vectors():
    a = canary_direction(7, 3, 1000)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    np.testing.assert_array_equal(a, canary_direction(7, 3, 1000))
    assert abs(a @ canary_direction(7, 4, 1000)) < 0.2 and abs(a @ canary_direction(8, 3, 1000)) < 0.2


def test_cosines_sign_scale_and_shape():
    d = 2000
    c0, c1 = canary_direction(1, 0, d), canary_direction(1, 1, d)
    cos = canary_cosines(5.0 * c0, 1, range(3))
    assert cos.shape == (3,)
    assert cos[0] == pytest.approx(1.0) and abs(cos[1]) < 0.15
    assert canary_cosines(-0.01 * c0, 1, [0])[0] == pytest.approx(-1.0)  # sign kept, norm of the vector irrelevant
    both = canary_cosines(np.stack([c0 + c1, np.zeros(d)]), 1, [0, 1])
    assert both.shape == (2, 2)
    np.testing.assert_allclose(both[0], [1 / math.sqrt(2)] * 2, atol=0.05)
    np.testing.assert_array_equal(both[1], [0.0, 0.0])  # a zero delta has cosine 0, not nan


# ------------------------------------------------------------------ the Gaussian mechanism, truth known

def _table(runs, **kw):
    rows = {}
    for z in NOISE:
        rows[z] = [epsilon_from_statistics(runs[s][z][0], DELTA, dim=DIM, **kw) for s in SEEDS]
    return rows


def test_estimate_matches_the_gaussian_mechanism_over_seeds(runs):
    """The paper's estimator (Gaussian fit to the inserted canaries' cosines, analytic null N(0, 1/d)):
    the seed average within 30% of the truth at each noise level, every seed within [0.85, 1.6] x truth.
    The band is asymmetric because the estimator is biased upward by the sampling error of the fitted
    deviation (see the module docstring); with k=1000 canaries the bias is largest at small epsilon."""
    paper, equal = _table(runs), _table(runs, equal_variance=True)
    empirical = {z: [epsilon_from_statistics(runs[s][z][0], DELTA, null=runs[s][z][1]) for s in SEEDS]
                 for z in NOISE}
    print(f"\nGaussian mechanism, d={DIM}, {CANARIES} canaries, delta={DELTA}")
    print(f"{'z':>5} {'truth':>7} | {'est (N(0,1/d) null), per seed':>44} | {'mean':>6} | "
          f"{'unseen-null mean':>16} | {'equal-var mean':>14}")
    for z in NOISE:
        t = true_epsilon(z)
        per = " ".join(f"{e:7.3f}" for e in paper[z])
        print(f"{z:5.2f} {t:7.3f} | {per} | {np.mean(paper[z]):6.3f} | {np.mean(empirical[z]):16.3f} | "
              f"{np.mean(equal[z]):14.3f}")
    for z in NOISE:
        t = true_epsilon(z)
        assert np.mean(paper[z]) == pytest.approx(t, rel=0.30)
        assert all(0.85 * t <= e <= 1.6 * t for e in paper[z]), (z, t, paper[z])
        assert np.mean(empirical[z]) == pytest.approx(t, rel=0.30)  # unobserved canaries as the null
        assert np.mean(equal[z]) == pytest.approx(t, rel=0.10)  # the ablation removes the deviation's bias


def test_estimate_falls_with_noise_and_is_large_without_it(runs):
    for s in SEEDS:
        est = [epsilon_from_statistics(runs[s][z][0], DELTA, dim=DIM) for z in (0.0, *NOISE)]
        assert est[0] > 30, est  # no noise: the truth is infinite; only the other canaries blur it
        assert all(a > b for a, b in zip(est, est[1:])), est


def test_sign_and_scale_of_the_statistics(runs):
    """Would catch a flipped canary or delta sign, or a null of the wrong width: in units of 1/sqrt(d),
    an inserted canary's cosine has mean 1/sqrt(z^2 + k/d) > 0 and deviation 1, an unobserved one mean 0
    and deviation 1 (the analytic null)."""
    for s in SEEDS:
        for z in NOISE:
            seen, unseen = runs[s][z]
            scale = math.sqrt(DIM)
            assert np.mean(seen) * scale == pytest.approx(1 / math.sqrt(z * z + CANARIES / DIM), rel=0.12)
            assert np.std(seen) * scale == pytest.approx(1.0, abs=0.07)
            assert abs(np.mean(unseen) * scale) < 0.15
            assert np.std(unseen) * scale == pytest.approx(1.0, abs=0.07)
    # epsilon is two-sided (DP's definition): a flipped statistic reads the same, so the sign is checked on the
    # means above; a null of the wrong width (1/d for 1/sqrt(d)) reads far higher
    seen = runs[0][1.0][0]
    right = epsilon_from_statistics(seen, DELTA, dim=DIM)
    assert epsilon_from_statistics(-seen, DELTA, dim=DIM) == pytest.approx(right)
    assert epsilon_from_statistics(seen, DELTA, dim=DIM ** 2) > 10 * right


def test_bootstrap_interval(runs):
    covered = 0
    for s in SEEDS:
        for z in NOISE:
            est = estimate_epsilon(runs[s][z][0], DELTA, dim=DIM, bootstrap=100, seed=s)
            assert est.low <= est.epsilon <= est.high
            assert est.observed == CANARIES and est.null == 0 and est.std_null == pytest.approx(DIM ** -0.5)
            covered += est.low <= true_epsilon(z) <= est.high
    assert covered >= 0.6 * len(SEEDS) * len(NOISE)  # percentile interval of a biased estimator: not 95%
    first, again = (estimate_epsilon(runs[0][1.0][0], DELTA, dim=DIM, bootstrap=50, seed=3) for _ in range(2))
    assert (first.low, first.high) == (again.low, again.high)  # reproducible from its seed


# ------------------------------------------------------------------ all iterates vs final model

def test_all_iterates_exceeds_final_model():
    """Rounds of a Gaussian mechanism, each canary inserted in one random round: the all-iterates statistic
    (max over rounds of the cosine with the round's delta, unobserved canaries as the null) sees each
    insertion at noise z; the final model (the sum of the rounds) at about z sqrt(T). The paper's shape:
    final-model estimate far below the per-insertion epsilon, all-iterates close to (at most) it."""
    d, k, rounds, z, seed = 20_000, 400, 4, 1.0, 11
    where = np.random.default_rng([seed, 77]).integers(0, rounds, k)
    tracker = MaxCosines(seed, k, k)
    final = np.zeros(d)
    for t in range(rounds):
        noise = np.random.default_rng([seed, 9, 9, t]).standard_normal(d)
        delta_t = canary_sum(seed, np.flatnonzero(where == t), d) + z * noise
        tracker.update(delta_t)
        final += delta_t
    assert tracker.rounds == rounds
    all_iterates = epsilon_from_statistics(tracker.observed, DELTA, null=tracker.unobserved)
    final_model = epsilon_from_statistics(canary_cosines(final, seed, range(k)), DELTA, dim=d)
    truth = true_epsilon(z)
    print(f"\nall iterates {all_iterates:.3f}, final model {final_model:.3f}, per-insertion truth {truth:.3f}, "
          f"final-model truth {true_epsilon(z * math.sqrt(rounds)):.3f}")
    assert final_model < all_iterates <= 1.3 * truth
    assert final_model == pytest.approx(true_epsilon(z * math.sqrt(rounds)), rel=0.5)


# ------------------------------------------------------------------ the lower bound (what a run reports)

def test_epsilon_grows_with_the_gap_at_fixed_deviations():
    """epsilon_lower_bound sets the means' gap to the smallest its region allows: right only if epsilon of two
    Gaussians is nondecreasing in the gap whatever the deviations and delta."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        sd0, sd1 = rng.uniform(0.3, 3.0, 2)
        delta = 10 ** rng.uniform(-6, -1)
        eps = [epsilon_two_gaussians(0.0, sd0, g, sd1, delta) for g in np.sort(rng.uniform(0, 4, 5))]
        assert all(b >= a - 1e-7 for a, b in zip(eps, eps[1:])), (sd0, sd1, delta, eps)


@pytest.mark.parametrize("k,z", [(10, 1.0), (67, 1.0), (400, 0.5)])
def test_lower_bound_stays_under_the_truth_where_the_point_estimate_does_not(k, z):
    """Gaussian statistics as the Gaussian mechanism's canaries give them (mean 1/z, deviation 1, in units of
    1/sqrt(d); analytic null): over 40 draws the bound exceeds the true epsilon in at most 5% (its confidence
    level), while the paper's point estimate exceeds it in most draws (its upward bias, largest with few
    canaries); with more canaries the bound tightens towards the truth."""
    d, truth = 10_000, true_epsilon(z)
    rng = np.random.default_rng([k, 5])
    draws = [(1 / z + rng.standard_normal(k)) / math.sqrt(d) for _ in range(40)]
    bound = np.array([epsilon_lower_bound(x, DELTA, dim=d) for x in draws])
    point = np.array([epsilon_from_statistics(x, DELTA, dim=d) for x in draws])
    assert np.mean(bound > truth) <= 0.05 and np.mean(point > truth) > 0.7
    assert (bound <= point + 1e-9).all()
    assert np.mean(bound) > {10: 0.1, 67: 0.55, 400: 0.8}[k] * truth


def test_lower_bound_with_an_empirical_null():
    """The all-iterates form: the null fitted too (four parameters in the region, so looser: about a third of
    the truth at 100 canaries and 100 unobserved)."""
    d, z, k, truth = 10_000, 1.0, 100, true_epsilon(1.0)
    rng = np.random.default_rng(7)
    bounds = [epsilon_lower_bound((1 / z + rng.standard_normal(k)) / math.sqrt(d), DELTA,
                                  null=rng.standard_normal(k) / math.sqrt(d)) for _ in range(15)]
    assert max(bounds) <= truth and np.mean(bounds) > 0.25 * truth
