"""LiRA, offline (``audit.membership: lira``): the likelihood-ratio membership attack of Carlini, Chien,
Nasr, Song, Terzis, Tramer, "Membership Inference Attacks From First Principles" (S&P 2022), in its
offline variant (the paper's Section IV-C; the reference code's ``fix_variance`` offline score).

Per scored sample, the statistic is the logit-scaled confidence of its true class, ``phi = log(p / (1 - p))``,
computed from the logits as ``z_y - logsumexp(z_j, j != y)`` (stable where ``p`` is near 0 or 1). Shadow
("OUT") models, trained without any scored sample, give ``phi``'s distribution for a non-member: a
Gaussian per sample, its mean over the shadows and, with fewer than ``PER_SAMPLE_VARIANCE_FROM`` shadows,
one variance pooled over every sample (the paper: per-sample variances need many shadows, a global one
works better with few). The offline test is one-sided: how unlikely a confidence as high as the target
model's is for an OUT model; the score is ``(phi_target - mean_out) / sd_out``, whose ranking is that of the
test's p-value ``1 - Phi(score)``, so AUC and TPR at 0.1% FPR are the test's.

Federated shadows, as fedsim builds them (``fedsim.audit.observer``): the target is a client's model as the
server decoded it after one round of local training from the global model the server sent. Each shadow
repeats that round: fedsim's own ``strategies.trainer.LocalTrainer`` from the same global model, with the
round's training settings (epochs, batch size, lr, momentum, weight decay) on as many samples as the
target held, so it takes the same number of local steps; its samples are a seeded draw from the training
data of the other clients (never the target's members; the non-members come from the test split, which no
shadow sees), each shadow a draw and a local seed of its own. The shadows are retrained for every audited
round and client (the global model they start from changes every round); their cost is in the row
(``membership_shadow_s``). They run plain local SGD, the FedAvg client's rule: what another client
algorithm or a defense did to the target's update is not in them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from strategies.trainer import ClientData, LocalTrainer, TrainSettings, forked_rng

from .membership import MembershipCase, roc_scores

LIRA_STREAM = 0x11A4  # the shadows' data draws and local seeds, a stream of the scenario seed of its own
PER_SAMPLE_VARIANCE_FROM = 64  # shadows from which each sample's own variance is used (Carlini et al.)


@dataclass
class ShadowSetup:
    """What training the shadows needs, picklable for the audit's worker."""

    start: dict[str, torch.Tensor]  # the global model the server sent the target (state dict)
    settings: list[TrainSettings]  # the target's round settings, each shadow's own local seed
    data: list[tuple[torch.Tensor, torch.Tensor]]  # each shadow's training samples (no scored sample)


def shadow_draws(pool: int, n: int, shadows: int, seed: int, server_round: int, partition_id: int
                 ) -> tuple[list[np.ndarray], list[int]]:
    """Each shadow's ``n`` sample positions in a pool of ``pool`` (without repeats; all of it when smaller)
    and its local-training seed, for one audited client and round."""
    rng = np.random.default_rng([seed, LIRA_STREAM, server_round, partition_id])
    draws = [np.sort(rng.choice(pool, size=min(n, pool), replace=False)) for _ in range(shadows)]
    return draws, [int(s) for s in rng.integers(2**62, size=shadows)]


def shadow_setup(start: dict[str, torch.Tensor], settings: TrainSettings, x_pool: torch.Tensor,
                 y_pool: torch.Tensor, n: int, shadows: int, seed: int, partition_id: int) -> ShadowSetup:
    draws, seeds = shadow_draws(len(y_pool), n, shadows, seed, settings.server_round, partition_id)
    idx = [torch.from_numpy(d) for d in draws]
    return ShadowSetup(start, [replace(settings, seed=s) for s in seeds], [(x_pool[i], y_pool[i]) for i in idx])


@torch.no_grad()
def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` per sample, from the logits (eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(y), batch):
        z = model(x[i:i + batch]).double()
        yb = y[i:i + batch]
        true = z.gather(1, yb[:, None]).squeeze(1)
        others = z.scatter(1, yb[:, None], float("-inf")).logsumexp(1)
        out.append(true - others)
    return torch.cat(out).cpu().numpy()


def train_shadow(model: nn.Module, setup: ShadowSetup, j: int) -> nn.Module:
    """Shadow ``j``: the target's round of local training, replayed on the shadow's own samples."""
    device = next(model.parameters()).device
    model.load_state_dict(setup.start)
    x, y = (t.to(device) for t in setup.data[j])
    data = ClientData(-1, x, y, x[:0], y[:0])
    for p in model.parameters():  # the attack's copy of the model may come frozen
        p.requires_grad_(True)
    with forked_rng(device), torch.enable_grad():  # the trainer seeds dropout; leave the worker's streams as they were
        LocalTrainer(model, data, setup.settings[j]).run()
    return model


def offline_scores(target: np.ndarray, shadows: np.ndarray) -> np.ndarray:
    """The one-sided offline statistic per sample: ``target`` (n,) against the OUT shadows' ``shadows``
    (s, n); a global deviation below ``PER_SAMPLE_VARIANCE_FROM`` shadows."""
    mean = shadows.mean(axis=0)
    if shadows.shape[0] >= PER_SAMPLE_VARIANCE_FROM:
        sd = shadows.std(axis=0, ddof=1)
    else:
        sd = np.full_like(mean, np.sqrt(np.mean(shadows.var(axis=0, ddof=1))))
    return (target - mean) / np.maximum(sd, 1e-12)


def lira(model: nn.Module, case: MembershipCase) -> dict[str, Any]:
    """The row's membership fields for ``case`` (``case.shadows`` set), ``model`` the scenario's architecture
    (on the attack's device): the shadows trained here, then the offline test on members and non-members."""
    setup: ShadowSetup = case.shadows
    device = next(model.parameters()).device
    x = torch.cat([case.members[0], case.nonmembers[0]]).to(device)
    y = torch.cat([case.members[1], case.nonmembers[1]]).to(device)
    began = time.perf_counter()
    shadow = copy.deepcopy(model)
    phis = np.stack([logit_confidence(train_shadow(shadow, setup, j), x, y) for j in range(len(setup.data))])
    spent = time.perf_counter() - began
    model.load_state_dict(case.weights)
    score = offline_scores(logit_confidence(model, x, y), phis)
    k = len(case.members[1])
    return {**roc_scores(score[:k], score[k:]), "membership_attack": "lira",
            "membership_shadows": len(setup.data), "membership_shadow_s": round(spent, 3)}
