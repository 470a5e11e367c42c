"""Label recovery from the classifier's gradient.

- Single image, iDLG (Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients",
  2020): with cross-entropy and non-negative penultimate features h, row k of the
  last layer's weight gradient is (p_k - y_k) h, negative only for the true class:
  the label is the argmin of the row sums.
- Batch counts (the bias/weight count estimate of Wainakh et al., "User-Level Label
  Leakage from Gradients in Federated Learning", PETS 2022, and Geng et al., "Towards
  General Deep Leakage in Federated Learning", 2021): the bias gradient is
  mean_n p_nk - n_k / B, so n_k ~= B (p_bar_k - g_k), with p_bar the model's mean
  softmax estimated on uninformative probe inputs; every class with a negative bias
  gradient is present at least once, the rest is filled by largest remainder.
  Without a bias, weight-row sums divided by the mean feature sum stand in.
  This is ``method="bias"``, the default. It assumes the batch's mean softmax is the
  probes' one, which holds for an untrained model; on digits models trained to ~90% test
  accuracy it recovered 66-84% of a batch of 8 (experiments/audit/RESULTS_labels_dropout.md).
- LLG, LLG+, LLG* (``method="llg" | "llg+" | "llg*"``, ``attacks.llg``): Wainakh et
  al.'s own rule on the weight-gradient row sums, with the per-occurrence impact and the
  per-class offset estimated from the gradient itself, auxiliary data or dummy inputs.
- Soft labels (Wang et al., "Towards Eliminating Hard Label Constraints in Gradient
  Inversion Attacks", ICLR 2024): for one sample, dW = (p - y) x^T and db = p - y, so
  the feature is x = lambda * r for a weight-gradient row r; lambda is found by L-BFGS
  (least squares of dW against db (lambda r)^T), then y = softmax(W x + b) - db.
  This recovers label smoothing and mixup labels exactly when the bias is trained.

For a multi-step update the negated update divided by (lr * S) stands in for the
gradient, minus weight_decay * w (the decay term every step adds, taken at the sent
weights): an average over the trajectory, exact for one step. S = T for plain SGD; with
momentum m, step t's direction is applied again in every later step (weights
1, m, m^2, ...), so S = sum over the T steps of (1 - m^(T-t)) / (1 - m).
Which batches the steps saw (the schedule) does not enter: only the average is used.

Under a ``support`` (a top-k or DGC upload: only some coordinates travelled) every rule reads
an unsent entry as 0, which is the middle of what the server knows of it (for top-k its
magnitude is below the smallest value sent). What that does, rule by rule:
- iDLG's argmin of row sums stays sound: with non-negative features every entry of row k has
  the sign of p_k - y_k, so the sent entries of the true class's row sum to <= 0 and every
  other row's to >= 0; it only needs one entry of the true row sent (that row has the largest
  magnitudes, 1 - p_y against p_k, so top-k sends it first);
- ``bias``: a class is marked present only on evidence: its bias entry was sent and is
  negative, or (only under a support) its bias entry was not sent and a sent entry of its
  weight row is negative (no sample of class k makes every entry of row k >= 0: p >= 0,
  h >= 0); the count estimate B (p_bar_k - g_k) takes g_k = 0 for an unsent bias entry,
  i.e. B p_bar_k, the probes' share;
- the LLG variants and the bias-free fallback sum weight rows over the sent entries only,
  which biases their impact estimates towards 0 by the unsent share; not corrected here.
"""

from __future__ import annotations

import torch

from .llg import LLG_VARIANTS, llg_counts
from .base import seeded_generator
from .observation import Observation

LABEL_METHODS = ("bias", *LLG_VARIANTS)


def momentum_steps(steps: int, momentum: float) -> float:
    """S: how many times, in total, local SGD applies a (constant) gradient's lr step."""
    # the gradient of the k-th last step is applied with weights 1, m, ..., m^(k-1)
    return float(sum((1.0 - momentum ** k) / (1.0 - momentum) for k in range(1, steps + 1)))


def _gradient(obs: Observation, index: int) -> torch.Tensor:
    """The observed gradient of parameter ``index``, or its estimate from an update."""
    if obs.gradients is not None:
        return obs.gradients[index]
    g = obs.update[index] * (-1.0 / (obs.lr * momentum_steps(obs.local_steps, obs.momentum)))
    if obs.weight_decay:
        g = g - obs.weight_decay * list(obs.model.parameters())[index]
    return g


def _last_layer_indices(obs: Observation) -> tuple[int, int | None]:
    """Parameter indices of the classifier's weight and bias (None without a bias)."""
    _, linear, w_idx = obs.last_linear()
    if linear.bias is None:
        return w_idx, None
    names = [n for n, _ in obs.model.named_parameters()]
    bias_name = names[w_idx][: -len("weight")] + "bias"
    return w_idx, names.index(bias_name)


def _last_layer_gradient(obs: Observation) -> tuple[torch.Tensor, torch.Tensor | None]:
    w_idx, b_idx = _last_layer_indices(obs)
    return _gradient(obs, w_idx), None if b_idx is None else _gradient(obs, b_idx)


def idlg_label(obs: Observation) -> torch.Tensor:
    """The label of a single image (iDLG). Returns a (1,) int64 tensor."""
    g_w, _ = _last_layer_gradient(obs)
    return g_w.sum(dim=1).argmin().reshape(1)


def _mean_probe_softmax(obs: Observation, probes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = seeded_generator(seed)
    lo, hi = obs.data_range
    x = lo + (hi - lo) * torch.rand(probes, *obs.input_shape, generator=gen)
    _, linear, _ = obs.last_linear()
    feats = []
    hook = linear.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    try:
        with torch.no_grad():
            probs = torch.softmax(obs.model(x), dim=-1)
    finally:
        hook.remove()
    return probs.mean(0), feats[0].sum(dim=1).mean()


def bias_label_counts(obs: Observation, *, probes: int = 64, seed: int = 0) -> torch.Tensor:
    """The bias-gradient count estimate (module docstring); int64, sums to the batch size."""
    batch = obs.batch_size
    g_w, g_b = _last_layer_gradient(obs)
    p_bar, feature_sum = _mean_probe_softmax(obs, probes, seed)
    if g_b is None:
        g_b = g_w.sum(dim=1) / feature_sum.clamp_min(1e-12)
    estimate = batch * (p_bar - g_b)
    counts = torch.zeros(obs.num_classes, dtype=torch.int64)
    present = torch.nonzero(g_b < 0).flatten()
    present = present[torch.argsort(g_b[present])]  # most negative first
    unsent = _unsent_bias_but_negative_row(obs, g_w)
    if unsent is not None:  # after the bias evidence, most negative row entry first
        present = torch.cat([present, unsent])
    present = present[:batch]
    counts[present] = 1
    for _ in range(batch - int(counts.sum())):
        counts[torch.argmax(estimate - counts.to(estimate.dtype))] += 1
    return counts


def _unsent_bias_but_negative_row(obs: Observation, g_w: torch.Tensor) -> torch.Tensor | None:
    """Under a support: classes whose bias entry did not travel but whose weight row has a sent
    negative entry (module docstring), most negative first; None without a support or a bias."""
    w_idx, b_idx = _last_layer_indices(obs)
    if obs.support is None or b_idx is None:
        return None
    w_sent, b_sent = obs.support[w_idx], obs.support[b_idx]
    row_min = torch.where(w_sent, g_w, torch.zeros_like(g_w)).min(dim=1).values
    found = torch.nonzero(~b_sent & (row_min < 0)).flatten()
    return found[torch.argsort(row_min[found])]


def batch_label_counts(obs: Observation, *, method: str = "bias", **options) -> torch.Tensor:
    """Estimated number of samples per class (int64, sums to the batch size).

    ``method``: ``bias`` (default; ``probes``, ``seed``) or an LLG variant (``llg``,
    ``llg+`` with ``aux=(images, labels)``, ``llg*`` with ``dummy``; ``repeats``, ``seed``;
    see ``attacks.llg``). Options a method does not take raise TypeError.
    """
    if method == "bias":
        return bias_label_counts(obs, **options)
    if method in LLG_VARIANTS:
        g_w, _ = _last_layer_gradient(obs)
        return llg_counts(obs, g_w.sum(dim=1), variant=method, **options)
    raise ValueError(f"unknown label method {method!r}; choose one of {', '.join(LABEL_METHODS)}")


def batch_labels(obs: Observation, *, method: str = "bias", **options) -> torch.Tensor:
    """The recovered label multiset, sorted (batch recovery cannot order samples).

    With the default method a single image takes iDLG's argmin; the LLG variants run
    their own rule at every batch size (for one image it predicts the negative row).
    """
    if obs.batch_size == 1 and method == "bias":
        return idlg_label(obs)
    counts = batch_label_counts(obs, method=method, **options)
    return torch.repeat_interleave(torch.arange(obs.num_classes), counts)


def soft_label(obs: Observation, *, max_iter: int = 100) -> torch.Tensor:
    """Soft label of a single sample (Wang et al., ICLR 2024). Returns (1, K)."""
    if obs.batch_size != 1:
        raise ValueError("analytic soft-label recovery needs batch size 1")
    g_w, g_b = _last_layer_gradient(obs)
    if g_b is None:
        raise ValueError("analytic soft-label recovery needs the last layer's bias gradient")
    _, linear, _ = obs.last_linear()
    # x = lambda * r for the row r whose bias entry is largest in magnitude; start from
    # the row's own ratio and refine lambda by L-BFGS against all rows.
    k = torch.argmax(g_b.abs())
    row = g_w[k]
    lam = (1.0 / g_b[k]).detach().clone().reshape(1).requires_grad_(True)
    scale = (g_w.norm() + 1e-12)
    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((g_w - torch.outer(g_b, lam * row)) / scale).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    x = lam.detach() * row
    with torch.no_grad():
        p = torch.softmax(linear(x.unsqueeze(0)), dim=-1)
    return (p - g_b.unsqueeze(0)).clamp_min(0.0)
