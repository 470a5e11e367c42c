"""The server's replay of a client's local training: batch schedule, momentum, weight decay."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from attacks import Observation, build_attack
from attacks.case import build_case
from attacks.label_recovery import _last_layer_gradient, batch_labels, momentum_steps
from attacks.metrics import label_accuracy
from attacks.objective import (batch_gradients, cosine_distance, dropout_shapes, leaf_parameters,
                               local_sgd_update, substitute_dropout)
from fedsim.world.models import build_model

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(dropout: float = 0.0) -> torch.nn.Module:
    return build_model("lenet", 1, 8, 10, dropout=dropout, seed=0).eval()


def _data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen), torch.randint(10, (n,), generator=gen)


def _shuffled(n: int, batch_size: int, epochs: int, seed: int = 0) -> list[torch.Tensor]:
    """What an epoch-shuffling client trains on: a fresh permutation per epoch, last batch partial."""
    gen = torch.Generator().manual_seed(seed)
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=gen).split(batch_size)]


def _relative(a, b) -> float:
    num = sum(((u - v) ** 2).sum() for u, v in zip(a, b)).sqrt()
    return float(num.detach() / sum((v ** 2).sum() for v in b).sqrt())


def _torch_sgd_update(net, x, y, schedule, *, lr, momentum=0.0, weight_decay=0.0, masks_per_step=None):
    """The reference: torch.optim.SGD over the same batches (dropout by the same substitution)."""
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(True)
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for t, idx in enumerate(schedule):
        masks = None if masks_per_step is None else [m[idx] for m in masks_per_step[t]]
        opt.zero_grad()
        with substitute_dropout(net, masks):
            loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return [p.detach() - p0 for p, p0 in zip(net.parameters(), w0)]


def _update_observation(net, update, schedule, **kw):
    return Observation.from_update(net, update, lr=0.05, local_steps=len(schedule), input_shape=SHAPE,
                                   num_classes=10, num_samples=5, schedule=schedule, **kw)


# ---------------------------------------------------------------- (a) exact replay
def test_schedule_momentum_weight_decay_match_torch_sgd():
    net, (x, y) = _net(), _data(5)
    schedule = _shuffled(5, 2, epochs=3)  # batches of 2, 2, 1 per epoch
    assert [len(i) for i in schedule] == [2, 2, 1] * 3
    ref = _torch_sgd_update(net, x, y, schedule, lr=0.05, momentum=0.9, weight_decay=1e-2)
    sim = local_sgd_update(net, leaf_parameters(net), x, y, lr=0.05, schedule=schedule, momentum=0.9,
                           weight_decay=1e-2, create_graph=False)
    assert _relative(sim, ref) < 1e-6
    # the settings matter: replaying the same run as plain SGD on consecutive slices is far off
    old = local_sgd_update(net, leaf_parameters(net), x, y, lr=0.05, steps=len(schedule), batch_size=2,
                           create_graph=False)
    assert _relative(old, ref) > 0.1


def test_dropout_masks_follow_the_schedule():
    net, (x, y) = _net(dropout=0.5), _data(5)
    schedule = _shuffled(5, 2, epochs=2, seed=1)
    gen = torch.Generator().manual_seed(2)
    masks = [[torch.bernoulli(torch.full((5, *s), 0.5), generator=gen) for s in dropout_shapes(net, SHAPE)]
             for _ in schedule]
    ref = _torch_sgd_update(net, x, y, schedule, lr=0.05, momentum=0.5, masks_per_step=masks)
    sim = local_sgd_update(net, leaf_parameters(net), x, y, lr=0.05, schedule=schedule, momentum=0.5,
                           masks_per_step=masks, create_graph=False)
    assert _relative(sim, ref) < 1e-6


# ---------------------------------------------------------------- (b) the default is unchanged
def test_without_schedule_the_replay_is_the_consecutive_slice_loop():
    net, (x, y) = _net(), _data(5)
    params = leaf_parameters(net)
    # the replay as it was before schedules: plain SGD on slices [t*b, (t+1)*b) mod n
    w = dict(params)
    for t in range(4):
        idx = torch.arange(t * 2, (t + 1) * 2) % 5
        loss = F.cross_entropy(functional_call(net, w, (x[idx],)), y[idx])
        grads = torch.autograd.grad(loss, list(w.values()))
        w = {k: v - 0.05 * g for (k, v), g in zip(w.items(), grads)}
    before = [w[k] - params[k] for k in params]
    now = local_sgd_update(net, params, x, y, lr=0.05, steps=4, batch_size=2, create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(now, before))
    # an explicit schedule of the same slices, and explicit zero momentum / decay, change nothing
    slices = [torch.arange(t * 2, (t + 1) * 2) % 5 for t in range(4)]
    same = local_sgd_update(net, params, x, y, lr=0.05, schedule=slices, momentum=0.0, weight_decay=0.0,
                            create_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(same, before))
    ref = _torch_sgd_update(net, x, y, slices, lr=0.05)
    assert _relative(now, ref) < 1e-6


# ---------------------------------------------------------------- (c) validation
def test_observation_takes_and_validates_the_training_description():
    net = _net()
    delta = [torch.zeros_like(p) for p in net.parameters()]
    obs = _update_observation(net, delta, [[2, 0], [1, 3], [4]], momentum=0.9, weight_decay=5e-4)
    assert obs.local_batch_size == 2  # the largest batch, when not given
    assert all(i.dtype == torch.int64 for i in obs.schedule) and obs.schedule[2].tolist() == [4]
    assert (obs.momentum, obs.weight_decay) == (0.9, 5e-4)
    plain = Observation.from_update(net, delta, lr=0.05, local_steps=3, input_shape=SHAPE, num_classes=10,
                                    num_samples=5)
    assert plain.schedule is None and plain.momentum == 0.0 and plain.weight_decay == 0.0

    bad = [
        (dict(schedule=[[0, 1], [2, 3]], local_steps=3), "2 batches, local_steps is 3"),
        (dict(schedule=[[0, 1], [2, 5], [4]]), r"schedule\[1\] has indices outside \[0, 5\)"),
        (dict(schedule=[[0, -1], [2, 3], [4]]), r"schedule\[0\] has indices outside"),
        (dict(schedule=[[0, 1], [], [4]]), r"schedule\[1\] must be a non-empty 1-D"),
        (dict(schedule=[[0, 1], [[2, 3]], [4]]), r"schedule\[1\] must be a non-empty 1-D"),
        (dict(schedule=[[0.0, 1.0], [2, 3], [4]]), r"schedule\[0\] must be .* integer"),
        (dict(schedule=[[True, False], [2, 3], [4]]), r"schedule\[0\] must be .* integer"),
        (dict(schedule=[[0, 1, 2], [3], [4]], local_batch_size=2), r"schedule\[0\] has 3 samples, more than"),
        (dict(schedule=[[0], [1], [2]], momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(schedule=[[0], [1], [2]], momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(schedule=[[0], [1], [2]], weight_decay=-1e-4), "weight_decay must be >= 0"),
        (dict(schedule=[[0], [1], [2]], weight_decay=float("nan")), "weight_decay must be >= 0"),
    ]
    for kw, message in bad:
        schedule = kw.pop("schedule")
        steps = kw.pop("local_steps", len(schedule))
        with pytest.raises(ValueError, match=message):
            Observation.from_update(net, delta, lr=0.05, local_steps=steps, input_shape=SHAPE, num_classes=10,
                                    num_samples=5, schedule=schedule, **kw)


def test_local_sgd_update_rejects_inconsistent_arguments():
    net, (x, y) = _net(), _data(4)
    with pytest.raises(ValueError, match="2 batches for 3 steps"):
        local_sgd_update(net, leaf_parameters(net), x, y, lr=0.1, steps=3, schedule=[[0], [1]])
    with pytest.raises(ValueError, match="needs a schedule, or steps and batch_size"):
        local_sgd_update(net, leaf_parameters(net), x, y, lr=0.1, steps=3)


# ---------------------------------------------------------------- (d) differentiable
def test_replay_is_differentiable_in_the_candidates():
    # float64 so that a central difference can check the gradient, not only its existence
    net, (x, y) = _net().double(), _data(5)
    x = x.double()
    schedule = _shuffled(5, 2, epochs=2)
    params = leaf_parameters(net)
    # seeded, not the global RNG: a random direction can have a near-zero derivative
    gen = torch.Generator().manual_seed(0)
    target = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params.values()]
    soft = F.one_hot(y, 10).double().requires_grad_(True)

    def loss(x_):
        sim = local_sgd_update(net, params, x_, soft, lr=0.05, schedule=schedule, momentum=0.9,
                               weight_decay=1e-2)
        return cosine_distance(sim, target)

    xr = x.clone().requires_grad_(True)
    g_x, g_soft = torch.autograd.grad(loss(xr), [xr, soft])
    for g in (g_x, g_soft):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    eps = 1e-4
    numeric = float((loss(x + eps * v) - loss(x - eps * v)).detach()) / (2 * eps)
    assert abs(numeric) > 1e-6  # a direction the loss really changes along
    assert abs(float((g_x * v).sum()) - numeric) <= 1e-6 * abs(numeric)


# ---------------------------------------------------------------- the attacks use it
def _client_update(seed: int, *, n: int, batch: int, epochs: int, lr: float, momentum: float, weight_decay: float):
    case = build_case(model="lenet", dataset="digits", batch_size=n, seed=seed, labels_known=True)
    net, x, y = case.observation.model, case.images, case.labels
    schedule = _shuffled(n, batch, epochs, seed=seed)
    ref = _torch_sgd_update(net, x, y, schedule, lr=lr, momentum=momentum, weight_decay=weight_decay)
    obs = Observation.from_update(net, ref, lr=lr, local_steps=len(schedule), input_shape=SHAPE, num_classes=10,
                                  num_samples=n, labels=y, schedule=schedule, momentum=momentum,
                                  weight_decay=weight_decay)
    return obs, x, y


def test_unrolled_ig_replays_the_observed_training():
    obs, x, y = _client_update(0, n=4, batch=2, epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-4)
    ig = build_attack("ig")
    sim = ig._simulate(obs, leaf_parameters(obs.model), x, y, None)
    assert _relative(sim, obs.update) < 1e-6
    blind = copy.copy(obs)
    blind.schedule, blind.momentum, blind.weight_decay = None, 0.0, 0.0
    assert _relative(ig._simulate(blind, leaf_parameters(obs.model), x, y, None), obs.update) > 0.1


def test_sme_surrogate_follows_weight_decay():
    # Strong decay: the update's direction is then mostly the decay term, which a
    # loss-only surrogate gradient cannot point along.
    obs, x, y = _client_update(0, n=2, batch=1, epochs=5, lr=0.01, momentum=0.0, weight_decay=0.05)
    sme = build_attack("sme")
    params = leaf_parameters(obs.model)
    target = sme._target(obs)
    blind = copy.copy(obs)
    blind.weight_decay = 0.0

    def best(o):
        return min(float(sme._objective_with(o, params, x, y, None, target, {"alpha": torch.tensor(a)}).detach())
                   for a in torch.linspace(0, 1, 11).tolist())

    assert best(obs) < 1e-3 < 0.01 < best(blind)


def test_momentum_steps_is_the_total_lr_weight_of_torch_sgd():
    # A linear loss has a constant gradient c, so the update is exactly -lr * S * c.
    for steps in (1, 3, 7):
        for momentum in (0.0, 0.5, 0.9):
            w = torch.zeros(3, requires_grad=True)
            c = torch.tensor([1.0, -2.0, 0.5])
            opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
            for _ in range(steps):
                opt.zero_grad()
                (w * c).sum().backward()
                opt.step()
            assert torch.allclose(w.detach(), -0.1 * momentum_steps(steps, momentum) * c, rtol=1e-5)
    assert momentum_steps(4, 0.0) == 4.0


def test_label_recovery_reads_momentum_and_weight_decay_updates():
    # one step: momentum does nothing and the decay term is removed exactly
    obs, x, y = _client_update(0, n=4, batch=4, epochs=1, lr=0.1, momentum=0.9, weight_decay=0.05)
    grads = batch_gradients(obs.model, leaf_parameters(obs.model), x, y, create_graph=False)
    observed = Observation.from_gradients(obs.model, grads, input_shape=SHAPE, num_classes=10, batch_size=4)
    for a, b in zip(_last_layer_gradient(obs), _last_layer_gradient(observed)):
        assert torch.allclose(a, b, atol=1e-5)
    # several momentum steps: counts come out of the right scale (0.8 when read as plain SGD)
    accs = []
    for seed in range(4):
        obs, _, y = _client_update(seed, n=8, batch=4, epochs=2, lr=0.01, momentum=0.9, weight_decay=5e-4)
        accs.append(label_accuracy(batch_labels(obs), y))
    assert min(accs) == 1.0, accs
