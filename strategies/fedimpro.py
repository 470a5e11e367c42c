"""FedImpro: train the high-level part on real plus shared, estimated feature distributions.

Chen, Yao, Han, Li, Shi, Tang, Chu, Zhang, "FedImpro: Measuring and Improving Client
Update in Federated Learning", ICLR 2024. Official code: ``FedImpro``
(``trainers/spliter.py`` for the low/high split and the feature estimator).

The model is split after a named block (``split_after``; ``auto`` picks ``layer2`` for
ResNet-18, the paper's best split, ``conv2`` for the CNN and LeNet, ``hidden0`` for the
MLP) into a low-level part (input -> features h) and a high-level part (h -> logits).

Client (state in ``Context.state``: its per-class estimates, kept across rounds):
- per-class diagonal Gaussian N(mu_c, sigma_c) of h, with moving averages over the
  training minibatches:  mu_c <- (1 - w) mu_c + w mean(h_c),  sigma_c likewise with the
  batch std,  w = min(1, n_c / N_pc), n_c the class's samples in the batch and N_pc its
  samples on the client (``ema_count`` > 0 fixes N_pc instead), so one epoch's weights
  sum to one. A class's first batch initialises its estimate (a zero start would bias
  it towards 0); sigma needs a batch with at least two samples of the class.
- loss = CE(high([h ; h_fake])[real], y) + ramp * CE(high(...)[fake], y_fake), with
  h_fake ~ N(mu_c, sigma_c) of the *global* estimates, B // K + 1 per known class (K of
  them), labels cyclic; the low-level part sees real data only (h_fake has no gradient
  path to it). ``ramp`` = ramp_max * min(1, round / ramp_rounds) (gradual to 1/2).
- upload {mu + e, sigma + e', class counts}, e ~ N(0, noise_std^2) (privacy knob), as an
  ArrayRecord beside the model: it counts in bytes_up.
Server: the model is averaged as FedAvg (by examples); per class, over the participants
that hold it, the estimates are averaged ``uniform``ly or ``class_count``-weighted with
pooled variance  sigma^2 = sum_i w_i sigma_i^2 + sum_i w_i (mu_i - mu)^2,  w_i = n_ic / n_c.
Classes no participant holds this round keep their previous global estimate. The global
estimates travel to the clients beside the model (they count in bytes_down).

``fidelity``: ``paper`` (default) is the rule above: the paper's method as fedsim reads it
(clients sample from the global estimate and upload a noisy local one), with fedsim's
choices where the paper leaves them open (sampled classes, estimate initialisation, EMA
weight, ramp, per-class server average). ``reference`` reproduces the official code
(``trainers/spliter.py``, ``FeatureSynthesisModels/GaussianSynthesisLabel.py``, with the
settings of its published run scripts: std mode ``update``, estimate mode ``selected`` /
``uniform``, weight schedule ``gradual2half`` over 500 epochs):
- the estimator starts as mu ~ U[0, 1) (seeded by the scenario seed, the same on every
  client) and sigma = ``feature_std`` (the official ``fed_split_noise_std``, 0.1), which
  also caps every sigma after each class's update (so in a step, classes after the first
  update from a capped sigma, as the official loop does);
- every round each client starts from the global estimator (no local state is kept),
  samples the fake features of each step from its *running* estimate, for all C classes
  (B // C + 1 of each, labels cyclic), then updates the estimate with the step's real
  features;
- moving-average weight w = min(1, F / N_pc) with N_pc = 5000 (``ema_count`` overrides)
  and F the number of elements of one feature (``prod(feat_shape)``: C*H*W on a
  convolutional split, the width on an MLP): the official code takes ``size(0)`` of the
  class's *mean* feature, not its sample count, and its models flatten the features
  first (``real_feat.view(B, -1)``), so that size is C*H*W (on ResNet-18 at layer2,
  128*16*16 / 5000 > 1: w = 1). This is a defect of the official code (w does not depend
  on how many samples of the class the batch holds), kept here because this mode
  reproduces that code. (Up to issue 22 fedsim took the channel count C here, which is
  exact on an MLP only and made the estimator 4-50x too slow on conv splits.) The paper
  mode is unaffected: its w is the sample count n_c / N_pc, whatever the feature's shape;
- loss = CE(real) + ramp * CE(fake), ramp = (round - 1) / ``ramp_rounds`` (500), uncapped
  (the official progress is its 0-based epoch counter, one per round with its default of
  one local epoch per round; with E local epochs it would count E per round, which this
  mode does not follow: it counts rounds);
- the upload is the estimate itself; ``noise_std`` is the official upload-noise option
  (``fed_split_client_mean_DP``), off (0) by default in this mode;
- the server averages the whole mu and sigma tensors uniformly over the round's
  participants (every class, held or not) and the model by examples (as the paper mode).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, UploadView, model_delta
from .stateful import DeltaStrategy, NDArrays, Reply, examples_or_uniform, load_state, save_state, to_record, to_torch, weighted_sum
from .upload import Upload

LOCAL_KEY = "fedimpro.local"
UPLOAD_KEY = "fedimpro.stats"
GLOBAL_KEY = "fedimpro.global"
AUTO_SPLITS = ("layer2", "conv2", "hidden0")
REFERENCE_RAMP_ROUNDS = 500  # fed_split_feature_weight_max_epochs in the official run scripts
REFERENCE_EMA_COUNT = 5000   # FeatureSynthesis.predefined_number_per_class


class FedImproParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split_after: str = Field("auto", description="block name ending the low-level part; auto: per model")
    noise_std: float = Field(0.001, ge=0, description="Gaussian noise added to the uploaded estimates")
    aggregation: Literal["uniform", "class_count"] = Field("uniform", description="server average of estimates")
    ramp_max: float = Field(0.5, ge=0, description="final weight of the loss on sampled features")
    ramp_rounds: int = Field(10, ge=1, description="rounds over which the weight grows linearly")
    ema_count: int = Field(0, ge=0, description="N_pc of the moving average; 0 = the client's class count "
                                                "(reference: 5000)")
    fidelity: Literal["paper", "reference"] = Field("paper", description="paper; reference: the official code")
    feature_std: float = Field(0.1, ge=0, description="reference: initial sigma and cap on sigma")

    @model_validator(mode="after")
    def _reference_defaults(self) -> "FedImproParams":
        """The reference mode's defaults are the official code's, where not set explicitly."""
        if self.fidelity == "reference":
            if "noise_std" not in self.model_fields_set:
                self.noise_std = 0.0
            if "ramp_rounds" not in self.model_fields_set:
                self.ramp_rounds = REFERENCE_RAMP_ROUNDS
        return self


# ----------------------------------------------------------------------------- pure math


def split_model(model: nn.Sequential, after: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a zoo model (an ``nn.Sequential`` of named blocks) into (low, high) after the block
    named ``after``. The two halves share parameters with ``model``: training them trains it."""
    names = [name for name, _ in model.named_children()]
    if after not in names[:-1]:
        raise ValueError(f"cannot split after {after!r}; choose one of {', '.join(names[:-1])}")
    cut = names.index(after) + 1
    children = list(model.named_children())
    return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))


def split_point(model: nn.Sequential, requested: str) -> str:
    if requested != "auto":
        return requested
    names = [n for n, _ in model.named_children()]
    for name in AUTO_SPLITS:
        if name in names[:-1]:
            return name
    return names[len(names) // 2 - 1]


def num_classes_of(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


@torch.no_grad()
def update_estimates(est: dict[str, torch.Tensor], h: torch.Tensor, y: torch.Tensor,
                     n_per_class: torch.Tensor) -> None:
    """One minibatch of the per-class moving averages, in place on ``est``
    (keys mu, sigma: [C, *feature]; seen_mu, seen_sigma: [C])."""
    for c in torch.unique(y).tolist():
        hc = h[y == c]
        n = hc.shape[0]
        w = min(1.0, n / max(float(n_per_class[c]), 1.0))
        m = hc.mean(0)
        if est["seen_mu"][c] > 0:
            est["mu"][c] = (1 - w) * est["mu"][c] + w * m
        else:
            est["mu"][c], est["seen_mu"][c] = m, 1.0
        if n >= 2:
            s = hc.std(0)
            if est["seen_sigma"][c] > 0:
                est["sigma"][c] = (1 - w) * est["sigma"][c] + w * s
            else:
                est["sigma"][c], est["seen_sigma"][c] = s, 1.0


def aggregate_gaussians(mus: list[np.ndarray], sigmas: list[np.ndarray], counts: list[np.ndarray],
                        mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class over the clients that hold it -> (mu, sigma, present mask)."""
    mu_s = np.stack([m.astype(np.float64) for m in mus])        # [M, C, *f]
    sd_s = np.abs(np.stack([s.astype(np.float64) for s in sigmas]))
    n = np.stack([c.astype(np.float64) for c in counts])       # [M, C]
    present = n.sum(0) > 0
    if mode == "uniform":
        w = (n > 0).astype(np.float64)
    else:
        w = n
    w = w / np.maximum(w.sum(0, keepdims=True), 1e-12)
    wb = w.reshape(w.shape + (1,) * (mu_s.ndim - 2))
    mu = (wb * mu_s).sum(0)
    if mode == "uniform":
        sigma = (wb * sd_s).sum(0)
    else:
        var = (wb * sd_s**2).sum(0) + (wb * (mu_s - mu) ** 2).sum(0)
        sigma = np.sqrt(var)
    return mu, sigma, present


@torch.no_grad()
def update_estimates_reference(mu: torch.Tensor, sigma: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                               weight: float, cap: float) -> None:
    """The official estimator update, in place: class by class, mu and (where the batch has two
    or more samples of the class) sigma move by the fixed ``weight``, and after each class every
    sigma is capped (so a later class updates from its capped sigma, as in the official loop)."""
    present = set(torch.unique(y).tolist())
    for c in range(len(mu)):
        if c in present:
            hc = h[y == c]
            mu[c] = (1 - weight) * mu[c] + weight * hc.mean(0)
            if hc.shape[0] >= 2:
                sigma[c] = (1 - weight) * sigma[c] + weight * hc.std(0)
        sigma.clamp_(max=cap)


def ramp_weight(server_round: int, params: FedImproParams) -> float:
    if params.fidelity == "reference":
        return (server_round - 1) / params.ramp_rounds
    return params.ramp_max * min(1.0, server_round / params.ramp_rounds)


# ----------------------------------------------------------------------------- server


class FedImproStrategy(DeltaStrategy):
    def __init__(self, params: FedImproParams, settings: ServerSettings):
        super().__init__(settings)
        self.params = params
        self.mu: np.ndarray | None = None
        self.sigma: np.ndarray | None = None
        self.known: np.ndarray | None = None

    def round_config(self, server_round, config):
        out = super().round_config(server_round, config)
        out["fedimpro-ramp"] = ramp_weight(server_round, self.params)
        return out

    def extra_records(self, server_round: int) -> dict[str, Any]:
        if self.known is None or not self.known.any():
            return {}
        return {GLOBAL_KEY: to_record({"mu": self.mu.astype(np.float32), "sigma": self.sigma.astype(np.float32),
                                       "known": self.known.astype(np.float32)})}

    def aggregate(self, server_round: int, global_arrays: NDArrays, replies: list[Reply]) -> NDArrays:
        stats = [r.records[UPLOAD_KEY] for r in replies]
        if self.params.fidelity == "reference":  # whole tensors, uniform over the participants
            self.mu = np.mean([s["mu"].numpy().astype(np.float64) for s in stats], axis=0)
            self.sigma = np.mean([s["sigma"].numpy().astype(np.float64) for s in stats], axis=0)
            self.known = np.ones(len(self.mu), bool)
            return weighted_sum([r.arrays for r in replies], examples_or_uniform(replies, "examples"))
        mu, sigma, present = aggregate_gaussians([s["mu"].numpy() for s in stats], [s["sigma"].numpy() for s in stats],
                                                 [s["count"].numpy() for s in stats], self.params.aggregation)
        if self.known is None:
            self.mu, self.sigma, self.known = np.zeros_like(mu), np.zeros_like(sigma), np.zeros(len(present), bool)
        self.mu[present], self.sigma[present] = mu[present], sigma[present]
        self.known |= present
        return weighted_sum([r.arrays for r in replies], examples_or_uniform(replies, "examples"))

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {"known_classes": int(self.known.sum()) if self.known is not None else 0}


# ----------------------------------------------------------------------------- client


class FedImproClient(ClientAlgorithm):
    params: FedImproParams

    def train(self, job: ClientJob) -> Upload:
        p, model, data, settings = self.params, job.model, job.data, job.settings
        low, high = split_model(model, split_point(model, p.split_after))
        num_classes = num_classes_of(model)
        with torch.no_grad():
            feat_shape = tuple(low(data.x[:1]).shape[1:])
        device = job.device  # seeded draws below are made on the CPU and moved (same draws on every device)
        est = load_state(job.state, LOCAL_KEY, device)
        if est is None or tuple(est["mu"].shape) != (num_classes, *feat_shape):
            est = {"mu": torch.zeros(num_classes, *feat_shape, device=device),
                   "sigma": torch.zeros(num_classes, *feat_shape, device=device),
                   "seen_mu": torch.zeros(num_classes, device=device), "seen_sigma": torch.zeros(num_classes, device=device)}
        counts = torch.bincount(data.y, minlength=num_classes).float()
        if p.fidelity == "reference":
            return self._train_reference(job, low, high, num_classes, feat_shape, counts)
        n_pc = torch.full_like(counts, float(p.ema_count)) if p.ema_count else counts

        ramp = float(job.content["config"].get("fedimpro-ramp", 0.0))
        fake_mu = fake_sigma = fake_classes = None
        if GLOBAL_KEY in job.content and ramp > 0:
            g = to_torch(job.content[GLOBAL_KEY], device)
            fake_classes = torch.nonzero(g["known"] > 0).flatten()
            fake_mu, fake_sigma = g["mu"], g["sigma"].abs()

        trainer = job.trainer()
        fake_gen = torch.Generator().manual_seed(settings.seed + 1)
        total_fake = 0.0
        for xb, yb in trainer.batches():
            h = low(xb)
            update_estimates(est, h.detach(), yb, n_pc)
            if fake_classes is not None and len(fake_classes):
                per = len(yb) // len(fake_classes) + 1
                y_fake = fake_classes.repeat(per)
                h_fake = fake_mu[y_fake] + fake_sigma[y_fake] * torch.randn(
                    (len(y_fake), *feat_shape), generator=fake_gen).to(device)
                out = high(torch.cat([h, h_fake]))
                loss = nn.functional.cross_entropy(out[: len(yb)], yb)
                loss_fake = nn.functional.cross_entropy(out[len(yb):], y_fake)
                trainer.step(loss, loss + ramp * loss_fake)
                total_fake += loss_fake.item()
            else:
                trainer.step(nn.functional.cross_entropy(high(h), yb))
        save_state(job.state, LOCAL_KEY, est)

        noise = torch.Generator().manual_seed(settings.seed + 2)
        up_mu = est["mu"] + p.noise_std * torch.randn(est["mu"].shape, generator=noise).to(device)
        up_sigma = est["sigma"] + p.noise_std * torch.randn(est["sigma"].shape, generator=noise).to(device)
        stats = to_record({"mu": up_mu, "sigma": up_sigma, "count": counts})
        metrics = {**trainer.metrics(), "fake_loss": total_fake / max(trainer.steps, 1)}
        return job.upload(trainer, metrics, {UPLOAD_KEY: stats})


    def _train_reference(self, job: ClientJob, low: nn.Module, high: nn.Module, num_classes: int,
                         feat_shape: tuple[int, ...], counts: torch.Tensor) -> Upload:
        p, settings = self.params, job.settings
        config = job.content["config"] if "config" in job.content else {}
        ramp = float(config.get("fedimpro-ramp", 0.0))
        shape = (num_classes, *feat_shape)
        device = job.device  # seeded draws below are made on the CPU and moved (same draws on every device)
        g = to_torch(job.content[GLOBAL_KEY], device) if GLOBAL_KEY in job.content else None
        if g is not None and tuple(g["mu"].shape) == shape:  # every round from the global estimator
            mu, sigma = g["mu"].clone(), g["sigma"].clone()
        else:  # the initial estimator, the same on every client
            init = torch.Generator().manual_seed(int(config.get("seed", 0)))
            mu, sigma = torch.rand(shape, generator=init).to(device), torch.full(shape, p.feature_std, device=device)
        # sic (see the docstring): the size of the official, flattened mean feature, C*H*W
        weight = min(1.0, math.prod(feat_shape) / float(p.ema_count or REFERENCE_EMA_COUNT))

        trainer = job.trainer()
        fake_gen = torch.Generator().manual_seed(settings.seed + 1)
        total_fake = 0.0
        for xb, yb in trainer.batches():
            y_fake = torch.arange(num_classes, device=device).repeat(len(yb) // num_classes + 1)
            h_fake = mu[y_fake] + sigma[y_fake] * torch.randn((len(y_fake), *feat_shape), generator=fake_gen).to(device)
            h = low(xb)
            out = high(torch.cat([h, h_fake]))
            loss = nn.functional.cross_entropy(out[: len(yb)], yb)
            loss_fake = nn.functional.cross_entropy(out[len(yb):], y_fake)
            update_estimates_reference(mu, sigma, h.detach(), yb, weight, p.feature_std)
            trainer.step(loss, loss + ramp * loss_fake)
            total_fake += loss_fake.item()

        if p.noise_std > 0:  # the official upload-noise option
            noise = torch.Generator().manual_seed(settings.seed + 2)
            mu = mu + p.noise_std * torch.randn(mu.shape, generator=noise).to(device)
            sigma = sigma + p.noise_std * torch.randn(sigma.shape, generator=noise).to(device)
        stats = to_record({"mu": mu, "sigma": sigma, "count": counts})
        metrics = {**trainer.metrics(), "fake_loss": total_fake / max(trainer.steps, 1)}
        return job.upload(trainer, metrics, {UPLOAD_KEY: stats})


def observe(sent, reply, params: FedImproParams) -> UploadView:
    return UploadView(model_delta(sent, reply), exact=False,
                      note="the replay leaves out the loss on sampled features (and sees the uploaded feature statistics only as bytes)")

SPEC = StrategySpec(
    name="fedimpro",
    params=FedImproParams,
    server=lambda params, settings: FedImproStrategy(params, settings),
    client=FedImproClient,
    observe=observe,
    plain_local_step=False,  # SAM's two gradients a step / a loss on synthetic features
)
