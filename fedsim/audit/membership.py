"""Membership inference beside the reconstruction (``audit.membership: loss``): the loss-threshold attack
of Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting" (CSF 2018): a sample is called a member when the model's loss on it is low.

The model is the one the audit attacks: under the update threat the target client's model as the server
decoded it (the weights sent plus the decoded update), under the gradient threat the global model the
server sent. Members are the target client's training samples; non-members as many held-out samples of
the same distribution (the central test split, a seeded choice; all of it when it is smaller). The
membership labels are ground truth, used to score only, as the reconstruction's truth is.

Scored threshold-free: the AUC of the score -loss, and the true-positive rate at a 0.1% false-positive
rate (Carlini et al., S&P 2022: the low-FPR regime is what matters). With n non-members the smallest
non-zero FPR is 1/n: below 1,000 non-members the figure is the TPR at *no* false positive, the strictest
threshold (``membership_nonmembers`` in the row says how many there were).

``audit.membership: lira`` scores the same members and non-members with LiRA (``fedsim.audit.lira``); the
case then carries its shadows' setup, and the row's ``membership_attack`` says which attack scored it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

FPR = 1e-3  # the false-positive rate at which the true-positive rate is reported
MEMBERSHIP_STREAM = 0x3E3B  # the choice of non-members, a stream of the scenario seed of its own


@dataclass
class MembershipCase:
    """What the loss-threshold attack needs, picklable for the audit's worker."""

    weights: dict[str, torch.Tensor]  # the attacked model's state dict
    members: tuple[torch.Tensor, torch.Tensor]
    nonmembers: tuple[torch.Tensor, torch.Tensor]
    shadows: Any = None  # fedsim.audit.lira.ShadowSetup: score with LiRA instead of the loss threshold


def nonmember_indices(n_pool: int, n_members: int, seed: int, server_round: int, partition_id: int) -> np.ndarray:
    """A seeded choice of ``min(n_members, n_pool)`` held-out samples for one audited client and round."""
    rng = np.random.default_rng([seed, MEMBERSHIP_STREAM, server_round, partition_id])
    return np.sort(rng.choice(n_pool, size=min(n_members, n_pool), replace=False))


@torch.no_grad()
def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Per-sample cross-entropy of ``model`` (eval mode)."""
    model.eval()
    return torch.cat([nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="none")
                      for i in range(0, len(y), batch)]).double().cpu().numpy()


def roc_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at ``FPR`` of the attack that calls high-scoring samples members."""
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    score = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(truth, score)
    return {"membership_auc": float(roc_auc_score(truth, score)),
            "membership_tpr_at_0.1%_fpr": float(tpr[fpr <= FPR].max()),
            "membership_members": int(len(member_scores)), "membership_nonmembers": int(len(nonmember_scores))}


def scores(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at ``FPR`` of the attack that calls low-loss samples members."""
    return roc_scores(-np.asarray(member_losses), -np.asarray(nonmember_losses))


def loss_threshold(model: nn.Module, case: MembershipCase) -> dict[str, Any]:
    """The row's membership fields for ``case``, with ``model`` (the scenario's architecture) loaded."""
    model.load_state_dict(case.weights)
    device = next(model.parameters()).device  # the attack's; the case travels on the CPU
    return {**scores(sample_losses(model, *(t.to(device) for t in case.members)),
                     sample_losses(model, *(t.to(device) for t in case.nonmembers))), "membership_attack": "loss"}
