"""Placing recovered labels on the samples of a multi-step update (attacks.label_assignment)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attacks import build_attack
from attacks.case import build_case
from attacks.label_assignment import needs_assignment, round_assignment, sinkhorn
from attacks.metrics import evaluate


def _step_multisets(labels, schedule):
    return [sorted(labels[idx].tolist()) for idx in schedule]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=5), st.integers(0, 1000))
def test_sinkhorn_plan_has_the_counts_and_rounding_keeps_them_exactly(counts, seed):
    counts = torch.tensor(counts)
    n = int(counts.sum())
    logits = torch.randn(n, len(counts), generator=torch.Generator().manual_seed(seed))
    plan = sinkhorn(logits, counts.float(), iterations=200)
    assert torch.allclose(plan.sum(1), torch.ones(n), atol=1e-5)
    assert torch.allclose(plan.sum(0), counts.float(), atol=1e-2)
    hard = round_assignment(plan, counts)
    assert torch.equal(torch.bincount(hard, minlength=len(counts)), counts)


def test_rounding_follows_a_confident_plan():
    plan = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert round_assignment(plan, torch.tensor([2, 1])).tolist() == [0, 1, 0]


def test_only_updates_over_several_batches_need_assignment():
    grad = build_case(model="lenet", dataset="digits", batch_size=4, seed=0).observation
    one_step = build_case(model="lenet", dataset="digits", batch_size=4, seed=0, threat="update",
                          local_steps=3, lr=0.05, local_batch_size=4).observation
    two_batches = build_case(model="lenet", dataset="digits", batch_size=4, seed=0, threat="update",
                             local_steps=2, lr=0.05, local_batch_size=2).observation
    assert not needs_assignment(grad)
    assert not needs_assignment(one_step)  # every step sees the whole batch: order is irrelevant
    assert needs_assignment(two_batches)


@pytest.mark.parametrize("seed", [0])
def test_joint_assignment_recovers_each_steps_labels_and_the_images(seed):
    """Counts recovered exactly (default-init LeNet, lr 0.05), 8 samples in 2 steps of 4: the
    joint placement puts the right labels in each step and IG gets through; the recovered
    multiset in sorted order (the behaviour before) leaves IG at noise level."""
    case = build_case(model="lenet", dataset="digits", image_size=16, init="default", batch_size=8, seed=seed,
                      threat="update", local_steps=2, lr=0.05, local_batch_size=4, labels_known=True)
    obs = dataclasses.replace(case.observation, labels=None)
    schedule = [torch.arange(0, 4), torch.arange(4, 8)]
    scores = {}
    for mode in ("joint", "sorted"):
        rec = build_attack("ig", iterations=300, seed=seed, label_assignment=mode).reconstruct(obs)
        scores[mode] = evaluate(rec.images, case.images, rec.hard_labels(), case.labels)
        if mode == "joint":
            assert _step_multisets(rec.hard_labels(), schedule) == _step_multisets(case.labels, schedule)
            assert rec.extras["label_assignment_iterations"] == 250
    assert scores["joint"]["label_accuracy"] == scores["sorted"]["label_accuracy"] == 1.0
    assert scores["joint"]["psnr"] >= 12.0, scores
    assert scores["joint"]["psnr"] >= scores["sorted"]["psnr"] + 5.0, scores


def test_bad_assignment_option_is_refused():
    with pytest.raises(ValueError, match="label_assignment"):
        build_attack("ig", label_assignment="random")
