"""One-shot empirical epsilon from random canaries (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar,
"One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024, arXiv 2302.03098).

The method, as implemented here:

- A canary is a direction drawn uniformly on the unit sphere of the model's dimension ``d``
  (a standard normal vector, normalised); canary ``i`` of a run is regenerated on demand from
  ``(seed, CANARY_STREAM, i)``, so nothing of size ``canaries x d`` is kept. In federated training a canary
  client's update is ``C * direction`` (``C`` the clip norm; the reference code scales it far past
  ``C`` and lets the clipper bring it to ``C``), weighted like any other client.
- Observed canaries (indices ``0 .. k-1``) are inserted; unobserved ones (indices ``k .. k+k'-1``,
  same seed) never are. The test statistic of a canary is the cosine between its direction and
  the released vector: the final model delta ``theta_T - theta_0`` (final-model threat), or, for
  the all-iterates threat, the maximum over rounds of the cosine with each round's model delta
  ``theta_t - theta_{t-1}`` (``MaxCosines``).
- Null distribution: a direction independent of the released vector has a cosine distributed as
  the first coordinate of a uniform point on the sphere, ``N(0, 1/d)`` to high accuracy for
  ``d >= 1000`` (the analytic null, used for the final model), or the statistics of the unobserved
  canaries (needed for the all-iterates maximum, whose null has no simple form).
- Both sets of statistics are fitted by Gaussians (mean, standard deviation); epsilon at ``delta``
  is the epsilon of the pair of Gaussians, i.e. the smallest ``eps >= 0`` with
  ``max(H_eps(P||Q), H_eps(Q||P)) <= delta`` where ``H_eps(P||Q) = sup_S P(S) - e^eps Q(S)`` is the
  hockey-stick divergence (``epsilon_two_gaussians``). For equal variances this is exactly the
  Gaussian mechanism with noise multiplier ``std / |mean difference|``; for the Gaussian mechanism
  in high dimension the estimate converges to the true epsilon (the paper's Theorem).
- The reported figure is a lower bound at 95% confidence (``epsilon_lower_bound``; our addition, the
  paper reports the point estimate): the smallest epsilon of any pair of Gaussians whose parameters lie
  in the fitted parameters' confidence region (Student t for a mean, chi-square for a deviation, one
  interval per fitted parameter at ``1 - (1 - level) / p`` so the region holds all ``p`` true parameters
  with probability ``level``, Bonferroni). If the statistics are Gaussian, as the method assumes, the
  true epsilon of the pair is in the region's range with that probability, so the bound exceeds it with
  probability at most ``1 - level`` whatever the number of canaries; with few canaries it is loose (low),
  never inflated. Why the point estimate is not reported alone: it is biased upward, and with few
  canaries by far (on the Gaussian mechanism at z = 1, d = 10,000, delta = 1e-5, true epsilon 4.38: 10
  canaries give 11.2 on average, 67 give 6.1, 1,000 give 4.75, above the truth in ~88% of draws at every
  count; the bound averages 1.0 / 3.05 / 4.02 and exceeds the truth in 2-3% of draws).
- Uncertainty of the point estimate: a percentile bootstrap over canaries (``estimate_epsilon``).
  The bias: the epsilon of two Gaussians is smallest when their deviations are equal, so sampling
  error in the fitted deviation (about ``1/sqrt(2k)`` relative, for ``k`` canaries) can only raise
  it; with 1000 canaries at ``delta = 1e-5`` the estimate of a Gaussian mechanism runs about 0-25% above the truth, more
  at small epsilon (tests/test_empirical_epsilon.py). ``equal_variance=True`` (not the paper's
  method; an ablation valid where the mechanism is a Gaussian one) fits one deviation to both.

Sign convention: here a canary client's update is added to the model (``theta + C * c``), so an
observed canary's cosine with the model delta is positive. (The reference code negates the cosine
because TFF clients send ``theta_0 - theta``.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy import optimize, special, stats

DEFAULT_BLOCK = 64  # canaries materialised at once when computing cosines
CANARY_STREAM = 0xCA9A  # canary i of a run seeded s is drawn from the generator keyed (s, CANARY_STREAM, i)


# ---------------------------------------------------------------- canaries

def canary_direction(seed: int, index: int, dim: int, dtype=np.float64) -> np.ndarray:
    """Canary ``index`` of the run seeded ``seed``: a uniform unit vector in ``R^dim``, the same on
    every call (its own generator, keyed ``(seed, CANARY_STREAM, index)``)."""
    if dim < 1:
        raise ValueError("dim must be positive")
    v = np.random.default_rng([int(seed), CANARY_STREAM, int(index)]).standard_normal(dim)
    v /= np.linalg.norm(v)
    return v.astype(dtype, copy=False)


def canary_blocks(seed: int, indices: Sequence[int] | range, dim: int,
                  block: int = DEFAULT_BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(positions, directions)`` with at most ``block`` canaries (rows) at a time;
    ``positions`` index into ``indices``."""
    idx = list(indices)
    for start in range(0, len(idx), block):
        chunk = idx[start:start + block]
        mat = np.empty((len(chunk), dim))
        for r, i in enumerate(chunk):
            mat[r] = canary_direction(seed, i, dim)
        yield np.arange(start, start + len(chunk)), mat


def canary_sum(seed: int, indices: Sequence[int] | range, dim: int, scale: float = 1.0) -> np.ndarray:
    """``scale * sum_i c_i`` over the given canaries (the inserted canaries' total contribution)."""
    total = np.zeros(dim)
    for _, mat in canary_blocks(seed, indices, dim):
        total += mat.sum(axis=0)
    return scale * total


def canary_cosines(vectors: np.ndarray, seed: int, indices: Sequence[int] | range,
                   block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Cosines of the canaries ``indices`` with ``vectors``: shape ``(len(indices),)`` for one
    vector, ``(m, len(indices))`` for ``m`` vectors (rows). A zero vector gives cosine 0."""
    v = np.asarray(vectors, dtype=np.float64)
    single = v.ndim == 1
    v2 = np.atleast_2d(v)
    if v2.ndim != 2:
        raise ValueError("vectors must be 1-D or 2-D")
    norms = np.linalg.norm(v2, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    out = np.zeros((v2.shape[0], len(indices)))
    for pos, mat in canary_blocks(seed, indices, v2.shape[1], block):
        out[:, pos] = (v2 @ mat.T) / safe[:, None]
    out[norms == 0] = 0.0
    return out[0] if single else out


class MaxCosines:
    """All-iterates statistic: per canary, the running maximum over rounds of the cosine with that
    round's model delta, for observed and unobserved canaries alike (start at -1, the minimum)."""

    def __init__(self, seed: int, observed: int, unobserved: int):
        self.seed = int(seed)
        self.observed_idx = range(0, observed)
        self.unobserved_idx = range(observed, observed + unobserved)
        self.observed = np.full(observed, -1.0)
        self.unobserved = np.full(unobserved, -1.0)
        self.rounds = 0

    def update(self, delta: np.ndarray) -> None:
        idx = list(self.observed_idx) + list(self.unobserved_idx)
        cos = canary_cosines(delta, self.seed, idx)
        k = len(self.observed_idx)
        np.maximum(self.observed, cos[:k], out=self.observed)
        np.maximum(self.unobserved, cos[k:], out=self.unobserved)
        self.rounds += 1


# ---------------------------------------------------------------- epsilon of two Gaussians

def _log_mass_below(x: float, mu: float, sd: float) -> float:
    return float(special.log_ndtr((x - mu) / sd))


def _log_mass_above(x: float, mu: float, sd: float) -> float:
    return float(special.log_ndtr((mu - x) / sd))


def _log_mass_between(lo: float, hi: float, mu: float, sd: float) -> float:
    if hi <= lo:
        return -math.inf
    if (lo - mu) > 0:  # both in the upper tail: difference of survival functions is accurate
        a, b = _log_mass_above(lo, mu, sd), _log_mass_above(hi, mu, sd)
    else:
        a, b = _log_mass_below(hi, mu, sd), _log_mass_below(lo, mu, sd)
    if b == -math.inf:
        return a
    return a + math.log1p(-math.exp(min(b - a, 0.0))) if b < a else -math.inf


def _log_mass(region: tuple, mu: float, sd: float) -> float:
    kind = region[0]
    if kind == "empty":
        return -math.inf
    if kind == "all":
        return 0.0
    if kind == "above":
        return _log_mass_above(region[1], mu, sd)
    if kind == "below":
        return _log_mass_below(region[1], mu, sd)
    if kind == "between":
        return _log_mass_between(region[1], region[2], mu, sd)
    if kind == "outside":
        return float(np.logaddexp(_log_mass_below(region[1], mu, sd), _log_mass_above(region[2], mu, sd)))
    raise ValueError(kind)


def _privacy_loss_region(mu_p: float, sd_p: float, mu_q: float, sd_q: float, eps: float) -> tuple:
    """The set ``{x : log p(x) - log q(x) > eps}`` for ``p = N(mu_p, sd_p^2)``, ``q = N(mu_q, sd_q^2)``:
    the roots of the quadratic ``a x^2 + b x + c``."""
    a = 0.5 / sd_q**2 - 0.5 / sd_p**2
    b = mu_p / sd_p**2 - mu_q / sd_q**2
    c = 0.5 * mu_q**2 / sd_q**2 - 0.5 * mu_p**2 / sd_p**2 + math.log(sd_q / sd_p) - eps
    if a == 0.0:
        if b == 0.0:
            return ("all",) if c > 0 else ("empty",)
        return ("above", -c / b) if b > 0 else ("below", -c / b)
    disc = b * b - 4.0 * a * c
    if disc <= 0.0:
        return ("all",) if a > 0 else ("empty",)
    q = -0.5 * (b + math.copysign(math.sqrt(disc), b))  # numerically stable roots
    roots = sorted([q / a, c / q] if q != 0.0 else [-math.sqrt(-c / a), math.sqrt(-c / a)])
    return ("outside", roots[0], roots[1]) if a > 0 else ("between", roots[0], roots[1])


def log_hockey_stick(mu_p: float, sd_p: float, mu_q: float, sd_q: float, eps: float) -> float:
    """``log H_eps(P||Q)``, ``H_eps(P||Q) = sup_S P(S) - e^eps Q(S)`` for two Gaussians (``-inf`` when 0)."""
    region = _privacy_loss_region(mu_p, sd_p, mu_q, sd_q, eps)
    lp = _log_mass(region, mu_p, sd_p)
    if lp == -math.inf:
        return -math.inf
    lq = _log_mass(region, mu_q, sd_q)
    r = eps + lq - lp
    if r >= 0.0:
        return -math.inf
    return lp + math.log1p(-math.exp(r))


def delta_two_gaussians(mu0: float, sd0: float, mu1: float, sd1: float, eps: float) -> float:
    """The smallest delta for which the pair (either order) is (eps, delta)-indistinguishable."""
    return math.exp(max(log_hockey_stick(mu0, sd0, mu1, sd1, eps), log_hockey_stick(mu1, sd1, mu0, sd0, eps)))


def epsilon_two_gaussians(mu0: float, sd0: float, mu1: float, sd1: float, delta: float,
                          eps_max: float = 1e4) -> float:
    """The epsilon at ``delta`` of distinguishing ``N(mu0, sd0^2)`` from ``N(mu1, sd1^2)``, both ways
    (``inf`` past ``eps_max``; a zero standard deviation with distinct means is ``inf`` too)."""
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")
    if not (sd0 >= 0 and sd1 >= 0) or not all(map(math.isfinite, (mu0, sd0, mu1, sd1))):
        raise ValueError("means and standard deviations must be finite, deviations >= 0")
    if sd0 == 0.0 or sd1 == 0.0:
        return 0.0 if (sd0 == sd1 and mu0 == mu1) else math.inf
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(log_hockey_stick(mu0, sd0, mu1, sd1, eps), log_hockey_stick(mu1, sd1, mu0, sd0, eps)) - log_delta

    if excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0.0:
        lo, hi = hi, hi * 2.0
        if hi > eps_max:
            return math.inf
    return float(optimize.brentq(excess, lo, hi, xtol=1e-10, rtol=1e-10))


# ---------------------------------------------------------------- the estimate

def _mean_interval(x: np.ndarray, alpha: float) -> tuple[float, float]:
    half = stats.t.ppf(1 - alpha / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size)
    return float(np.mean(x) - half), float(np.mean(x) + half)


def _sd_interval(x: np.ndarray, alpha: float) -> tuple[float, float]:
    n, sd = x.size, float(np.std(x, ddof=1))
    return (sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - alpha / 2, n - 1)),
            sd * math.sqrt((n - 1) / stats.chi2.ppf(alpha / 2, n - 1)))


def _deviations(interval: tuple[float, float], also: float, grid: int) -> np.ndarray:
    """Points of ``interval`` to search, with ``also`` (clipped into it) among them."""
    return np.unique(np.r_[np.linspace(*interval, grid), np.clip(also, *interval)])


def epsilon_lower_bound(observed: Sequence[float], delta: float, null: Sequence[float] | None = None,
                        dim: int | None = None, level: float = 0.95, grid: int = 9) -> float:
    """The smallest epsilon at ``delta`` of two Gaussians whose means and deviations lie in the confidence
    region (at ``level``) of those fitted to the observed statistics and to the null (the unobserved
    canaries' statistics, or the analytic ``N(0, 1/dim)``, which has nothing to fit): a lower bound on the
    pair's true epsilon at confidence ``level`` when the statistics are Gaussian (module docstring).

    The means enter through their gap only, and epsilon grows with the gap at fixed deviations, so the
    gap is set to the smallest the region allows; the deviations are searched on a grid of ``grid``
    points per interval (the equal-deviation point included when inside)."""
    obs = np.asarray(observed, dtype=np.float64)
    nul = None if null is None else np.asarray(null, dtype=np.float64)
    if obs.size < 2 or (nul is not None and nul.size < 2):
        raise ValueError("need at least 2 statistics on each fitted side")
    alpha = (1 - level) / (2 if nul is None else 4)  # per fitted parameter: Bonferroni over the region
    lo1, hi1 = _mean_interval(obs, alpha)
    if nul is None:
        lo0 = hi0 = 0.0
        sd0s = np.array([_null_fit(None, dim)[1]])
    else:
        lo0, hi0 = _mean_interval(nul, alpha)
        sd0s = _deviations(_sd_interval(nul, alpha), float(np.std(obs, ddof=1)), grid)
    gap = max(0.0, lo1 - hi0, lo0 - hi1)
    sd1_range = _sd_interval(obs, alpha)
    return min(epsilon_two_gaussians(0.0, sd0, gap, sd1, delta)
               for sd0 in sd0s for sd1 in _deviations(sd1_range, sd0, grid))


@dataclass(frozen=True)
class EpsilonEstimate:
    epsilon: float  # from the Gaussian fits (the paper's point estimate)
    lower: float  # epsilon_lower_bound at ``level``
    low: float  # bootstrap percentile interval over canaries (nan without a bootstrap)
    high: float
    level: float
    delta: float
    mean_observed: float
    std_observed: float
    mean_null: float
    std_null: float
    observed: int
    null: int  # 0 for the analytic null N(0, 1/dim)
    dim: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def _fit(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1))


def _null_fit(null: np.ndarray | None, dim: int | None) -> tuple[float, float]:
    if null is not None:
        return _fit(null)
    if not dim:
        raise ValueError("give the unobserved canaries' statistics (null) or the dimension (dim)")
    return 0.0, 1.0 / math.sqrt(dim)


def _pooled(obs: np.ndarray, nul: np.ndarray | None, sd0: float) -> float:
    """The one deviation of ``equal_variance``: the analytic null's, or both sets' pooled."""
    if nul is None:
        return sd0
    return float(np.sqrt(((obs.size - 1) * np.var(obs, ddof=1) + (nul.size - 1) * np.var(nul, ddof=1))
                         / (obs.size + nul.size - 2)))


def _epsilon(obs: np.ndarray, nul: np.ndarray | None, dim: int | None, delta: float,
             equal_variance: bool) -> tuple[float, float, float, float, float]:
    mu1, sd1 = _fit(obs)
    mu0, sd0 = _null_fit(nul, dim)
    if equal_variance:
        sd0 = sd1 = _pooled(obs, nul, sd0)
    return epsilon_two_gaussians(mu0, sd0, mu1, sd1, delta), mu1, sd1, mu0, sd0


def epsilon_from_statistics(observed: Sequence[float], delta: float, null: Sequence[float] | None = None,
                            dim: int | None = None, equal_variance: bool = False) -> float:
    """Epsilon of the Gaussian fitted to the observed canaries' statistics against the null: the
    unobserved canaries' statistics when given, else the analytic ``N(0, 1/dim)``."""
    obs = np.asarray(observed, dtype=np.float64)
    if obs.size < 2:
        raise ValueError("need at least 2 observed canaries")
    return _epsilon(obs, None if null is None else np.asarray(null, dtype=np.float64), dim, delta,
                    equal_variance)[0]


def estimate_epsilon(observed: Sequence[float], delta: float, null: Sequence[float] | None = None,
                     dim: int | None = None, bootstrap: int = 200, level: float = 0.95,
                     seed: int = 0, equal_variance: bool = False) -> EpsilonEstimate:
    """``epsilon_from_statistics`` with ``epsilon_lower_bound`` at ``level`` and a percentile bootstrap
    interval of the point estimate: observed (and empirical null) statistics resampled with replacement,
    ``bootstrap`` times."""
    obs = np.asarray(observed, dtype=np.float64)
    nul = None if null is None else np.asarray(null, dtype=np.float64)
    if obs.size < 2:
        raise ValueError("need at least 2 observed canaries")
    eps, mu1, sd1, mu0, sd0 = _epsilon(obs, nul, dim, delta, equal_variance)
    lower = epsilon_lower_bound(obs, delta, null=nul, dim=dim, level=level)
    low = high = math.nan
    if bootstrap > 0:
        rng = np.random.default_rng([int(seed), 0xE95])
        draws = np.empty(bootstrap)
        for b in range(bootstrap):
            o = obs[rng.integers(0, obs.size, obs.size)]
            n = None if nul is None else nul[rng.integers(0, nul.size, nul.size)]
            draws[b] = _epsilon(o, n, dim, delta, equal_variance)[0]
        finite = draws[np.isfinite(draws)]
        if finite.size == draws.size:
            low, high = (float(q) for q in np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]))
        else:  # some resamples are perfectly separable: the interval is open above
            low = float(np.quantile(draws, (1 - level) / 2)) if finite.size else math.inf
            high = math.inf
    return EpsilonEstimate(epsilon=eps, lower=lower, low=low, high=high, level=level, delta=delta,
                           mean_observed=mu1, std_observed=sd1, mean_null=mu0, std_null=sd0,
                           observed=int(obs.size), null=0 if nul is None else int(nul.size), dim=dim)


__all__ = ["EpsilonEstimate", "MaxCosines", "canary_blocks", "canary_cosines", "canary_direction", "canary_sum",
           "delta_two_gaussians", "epsilon_from_statistics", "epsilon_lower_bound", "epsilon_two_gaussians",
           "estimate_epsilon", "log_hockey_stick"]
