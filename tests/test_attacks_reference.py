"""Attacks against the rules of their official code, written out here from reading that code.

SME (Zhu, Yao, Blaschko, ICML 2023; ``JunyiZhu-AI/surrogate_model_extension``,
``sme/Adversary/adversary.py`` ``IWU.reconstruction`` and ``sme/Adversary/utils.py``):
surrogate (1 - alpha) w0 + alpha w1 written into a copy of the model; the update direction
w0 - w1 and the surrogate's gradient each divided by their global norm; loss
1 - <d, g> + lamb * (mean |dh| + mean |dw|) / 2; torch.optim.Adam on the images at lr eta with
the plain (unsigned) gradient, Adam on alpha at lr beta with dL/dalpha accumulated by hand as
sum dL/dz * (w1 - w0); images clamped to the data box, alpha to [0, 1]; MultiStepLR x0.1 at
iters // 2.667, // 1.6, // 1.142 on both; the start torch.normal(0, 1) clamped to the box.
"""

import copy

import pytest
import torch

from attacks import build_attack
from attacks.case import build_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _official_sme(model, w0, w1, labels, x0, iters, lamb=0.01, eta=1.0, beta=1e-3, alpha=0.5):
    """Every iterate of the official SME loop (and the final alpha), box [0, 1]."""
    net0, net1 = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    with torch.no_grad():
        for p, v in zip(net0.parameters(), w0):
            p.copy_(v)
        for p, v in zip(net1.parameters(), w1):
            p.copy_(v)
    x = x0.clone().requires_grad_(True)
    a = torch.tensor(alpha, requires_grad=True)
    a.grad = torch.tensor(0.0)
    opt, a_opt = torch.optim.Adam([x], lr=eta), torch.optim.Adam([a], lr=beta)
    milestones = [iters // 2.667, iters // 1.6, iters // 1.142]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    a_sched = torch.optim.lr_scheduler.MultiStepLR(a_opt, milestones=milestones, gamma=0.1)
    direction = [p.detach() - q.detach() for p, q in zip(net0.parameters(), net1.parameters())]
    norm = sum(d.square().sum() for d in direction).sqrt()
    direction = [d / norm for d in direction]
    surrogate = copy.deepcopy(net0).requires_grad_(True)
    iterates = []
    for _ in range(iters):
        opt.zero_grad()
        a_opt.zero_grad(set_to_none=False)  # the code's torch 1.x zero_grad: its += needs a tensor
        surrogate.zero_grad()
        with torch.no_grad():
            for p, q, z in zip(net0.parameters(), net1.parameters(), surrogate.parameters()):
                z.copy_((1 - a) * p + a * q)
        loss = torch.nn.functional.cross_entropy(surrogate(x), labels)
        grads = torch.autograd.grad(loss, list(surrogate.parameters()), create_graph=True)
        gnorm = sum(g.square().sum() for g in grads).sqrt()
        cos_loss = 1 - sum((d * g / gnorm).sum() for d, g in zip(direction, grads))
        tv = ((x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean() + (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()) / 2
        (cos_loss + lamb * tv).backward()
        with torch.no_grad():
            for p, q, z in zip(net0.parameters(), net1.parameters(), surrogate.parameters()):
                a.grad += (z.grad * (q - p)).sum()
        opt.step()
        a_opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
            a.clamp_(0, 1)
        sched.step()
        a_sched.step()
        iterates.append(x.detach().clone())
    return iterates, float(a.detach())


@pytest.fixture
def float64():
    """Lr 1 on unsigned Adam turns float32 rounding (~1e-7) into 2e-6 within two steps: compare in float64
    (the case is built in float32, then its model and update are cast)."""
    old = torch.get_default_dtype()
    yield lambda: torch.set_default_dtype(torch.float64)
    torch.set_default_dtype(old)


def test_sme_reference_fidelity_follows_the_official_loop(float64):
    case = build_case(model="lenet", dataset="digits", batch_size=2, seed=0, threat="update", local_steps=3,
                      lr=0.01, labels_known=True, init="uniform")
    obs = case.observation
    obs.model.double()
    obs.update = [u.double() for u in obs.update]
    float64()
    w0 = [p.detach().clone() for p in obs.model.parameters()]
    w1 = [p + u for p, u in zip(w0, obs.update)]
    iters, seed = 8, 3  # 8 iterations put all three decays (after 2, 4, 7) inside the run
    x0 = torch.randn((obs.batch_size, *obs.input_shape), generator=torch.Generator().manual_seed(seed)).clamp(0, 1)
    ref, ref_alpha = _official_sme(obs.model, w0, w1, obs.labels, x0, iters)

    seen = []
    attack = build_attack("sme", fidelity="reference", iterations=iters, seed=seed,
                          callback=lambda it, x: seen.append(x.clone()))
    rec = attack.reconstruct(obs)
    assert len(seen) == iters and rec.iterations == iters and rec.stopped == "budget"
    for it, (mine, theirs) in enumerate(zip(seen, ref)):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=0), (it, (mine - theirs).abs().max())
    assert rec.extras["alpha"] == pytest.approx(ref_alpha, abs=1e-6)
    # The images moved (lr 1, unsigned) and the decays fired where the code puts them.
    assert (ref[0] - x0).abs().max() > 0.1
    assert attack._milestones() == [2, 4, 7]  # 8 // 1.6 is 4.0 in floating point


def test_sme_reference_settings_and_overrides():
    ref = build_attack("sme", fidelity="reference")
    assert (ref.tv, ref.lr, ref.signed, ref.stop_patience) == (0.01, 1.0, False, 0)
    mixed = build_attack("sme", fidelity="reference", lr=0.1, tv=1e-3)
    assert (mixed.tv, mixed.lr, mixed.signed) == (1e-3, 0.1, False)
    default = build_attack("sme")
    assert (default.tv, default.lr, default.signed, default._milestones()) == (1e-4, 0.1, True, None)
    with pytest.raises(ValueError, match="fidelity"):
        build_attack("sme", fidelity="paper")


# -- Dropout Inversion's schedule (dAI-SY-Group/DropoutInversionAttack, src/attacks.py attack_batch,
#    src/utils.py EarlyStopping, example_configs/attacks/DIA.yaml) ------------------------------------

def _dia_case():
    return build_case(model="lenet", dataset="digits", batch_size=1, seed=0, dropout=0.5, labels_known=True)


def test_dia_reference_schedule_returns_the_lowest_loss_iterate():
    seen = []
    rec = build_attack("dia", schedule="reference", iterations=25, seed=0,
                       callback=lambda it, x: seen.append(x.clone())).reconstruct(_dia_case().observation)
    trace = rec.loss_trace
    # EarlyStopping(delta 0): the first strictly lowest loss; the iterate kept is the one after that step.
    best = min(range(len(trace)), key=lambda i: (trace[i], i))
    assert rec.extras["best_iteration"] == best and rec.extras["final_loss"] == trace[best]
    assert torch.equal(rec.images, seen[best].clamp(0, 1))
    assert best < len(trace) - 1 or trace[-1] == min(trace)


def test_dia_reference_schedule_stops_at_the_loss_floor_and_patience(monkeypatch):
    obs = _dia_case().observation
    rec = build_attack("dia", schedule="reference", iterations=40, seed=0, loss_floor=10.0).reconstruct(obs)
    assert rec.iterations == 1 and rec.stopped == "converged"  # the first loss is below 10
    monkeypatch.setattr("attacks.dropout_inversion.REFERENCE_PATIENCE", 3)
    rec = build_attack("dia", schedule="reference", iterations=200, seed=0, loss_floor=None, lr=1e-9).reconstruct(obs)
    # lr ~0: the loss stops improving at once; 3 non-improving iterations end the run.
    assert rec.stopped == "converged" and rec.iterations < 20, rec.iterations
    with pytest.raises(ValueError, match="schedule"):
        build_attack("dia", schedule="paper")
