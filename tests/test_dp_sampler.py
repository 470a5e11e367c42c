"""DP-SGD's Poisson batches against Opacus's own sampler, by statistics (issue 22).

fedsim draws its Poisson batches itself (seeded by the client's round seed, so one scenario seed
gives one run on every engine) instead of through Opacus's ``DPDataLoader``. Reading the two is not
enough: over many draws both must give the same number of steps an epoch, batch sizes distributed
Binomial(n, q), and every sample included at rate q, independently of the others.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from defenses.dp_sgd import PoissonSampler, steps_per_epoch

N, BATCH = 50, 8
DRAWS = 600  # schedules (epochs) from each sampler


def fedsim_batches() -> list[np.ndarray]:
    out = []
    for seed in range(DRAWS):
        settings = SimpleNamespace(seed=seed, batch_size=BATCH, local_epochs=1)
        out.extend(idx.numpy() for idx in PoissonSampler().schedule(N, settings))
    return out


def opacus_batches() -> list[np.ndarray]:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    k = steps_per_epoch(N, BATCH)
    # What DPDataLoader.from_data_loader builds for a loader of batch size BATCH over N samples.
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=1 / k, generator=torch.Generator().manual_seed(0))
    return [np.asarray(b, dtype=np.int64) for _ in range(DRAWS) for b in sampler]


@pytest.fixture(scope="module")
def both():
    return {"fedsim": fedsim_batches(), "opacus": opacus_batches()}


def test_steps_per_epoch_are_opacus_data_loader_length():
    from opacus.data_loader import DPDataLoader

    data = torch.utils.data.TensorDataset(torch.zeros(N, 1))
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(data, batch_size=BATCH))
    settings = SimpleNamespace(seed=0, batch_size=BATCH, local_epochs=3)
    assert len(PoissonSampler().schedule(N, settings)) == 3 * len(loader) == 3 * steps_per_epoch(N, BATCH)


@pytest.mark.parametrize("source", ["fedsim", "opacus"])
def test_batch_sizes_are_binomial(both, source):
    q = 1 / steps_per_epoch(N, BATCH)
    sizes = np.array([len(b) for b in both[source]])
    # Bins with at least ~5 expected counts: 0..lo-1 pooled, each size, hi+1..N pooled.
    lo, hi = int(stats.binom.ppf(0.01, N, q)), int(stats.binom.ppf(0.99, N, q))
    edges = [-0.5, *np.arange(lo, hi + 1) + 0.5, N + 0.5]
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges[1:]) - 0.5, N, q), prepend=0.0) * len(sizes)
    expected[-1] = len(sizes) - expected[:-1].sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_fedsim_and_opacus_batch_sizes_share_one_distribution(both):
    a = [len(b) for b in both["fedsim"]]
    b = [len(b) for b in both["opacus"]]
    assert stats.mannwhitneyu(a, b).pvalue > 1e-3
    assert stats.ks_2samp(a, b).pvalue > 1e-3


@pytest.mark.parametrize("source", ["fedsim", "opacus"])
def test_every_sample_is_included_at_rate_q(both, source):
    batches = both[source]
    q = 1 / steps_per_epoch(N, BATCH)
    counts = np.bincount(np.concatenate(batches), minlength=N)
    assert all(len(set(b.tolist())) == len(b) for b in batches)  # no sample twice in one batch
    # Each sample's count is Binomial(steps, q): the overall rate within 4 sigma, and no sample out of line.
    steps = len(batches)
    rate = counts.sum() / (steps * N)
    assert abs(rate - q) < 4 * np.sqrt(q * (1 - q) / (steps * N))
    assert stats.chisquare(counts).pvalue > 1e-3


def test_a_sample_s_inclusions_do_not_depend_on_another_s(both):
    """Pairs of samples co-occur at rate q^2, as independent Bernoulli draws do."""
    batches = both["fedsim"]
    q = 1 / steps_per_epoch(N, BATCH)
    member = np.zeros((len(batches), N), dtype=bool)
    for i, b in enumerate(batches):
        member[i, b] = True
    together = (member[:, 0] & member[:, 1]).sum()
    expected = len(batches) * q * q
    assert abs(together - expected) < 4 * np.sqrt(expected)
