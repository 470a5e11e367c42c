"""strategies.sgd.LocalSGD: torch.optim.SGD's updates bit for bit, without importing torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from strategies.sgd import LocalSGD


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3)])
def test_same_parameters_as_torch_optim_sgd(momentum, weight_decay):
    ours, ref = _model(0), _model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    our_opt = LocalSGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        for model, opt in ((ref, ref_opt), (ours, our_opt)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:  # a parameter without a gradient this step is left alone by both
                model[0].bias.grad = None
            opt.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, _model(0)[0].weight)  # it did train


def test_zero_grad_and_bad_settings():
    model = _model(0)
    opt = LocalSGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 6)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="lr"):
        LocalSGD(model.parameters(), lr=-1.0)


def test_training_does_not_import_dynamo():
    code = ("import sys, torch; from strategies.sgd import LocalSGD; m = torch.nn.Linear(3, 2); "
            "o = LocalSGD(m.parameters(), lr=0.1, momentum=0.9); m(torch.ones(1, 3)).sum().backward(); o.step(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
