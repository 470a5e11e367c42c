"""The observation API: built from plain things a server has; the registry."""

import pytest
import torch

import attacks
from attacks import Observation, build_attack
from attacks.objective import batch_gradients, leaf_parameters
from fedsim.world.models import build_model


def _model():
    return build_model("lenet", 1, 8, 10, init="uniform", seed=0)


def test_from_gradients_accepts_list_dict_and_state_dict():
    net = _model()
    x, y = torch.rand(1, 1, 8, 8), torch.tensor([3])
    grads = batch_gradients(net, leaf_parameters(net), x, y, create_graph=False)
    names = [n for n, _ in net.named_parameters()]
    a = Observation.from_gradients(net, grads, input_shape=(1, 8, 8), num_classes=10, batch_size=1)
    b = Observation.from_gradients(_model(), dict(zip(names, grads)), input_shape=(1, 8, 8), num_classes=10,
                                   batch_size=1, state_dict=net.state_dict())
    for ga, gb in zip(a.gradients, b.gradients):
        assert torch.equal(ga, gb)
    assert a.threat == "gradient" and not a.labels_known
    # the observation owns a frozen copy: training the caller's model later changes nothing
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not torch.equal(next(a.model.parameters()), next(net.parameters()))


def test_from_update_and_validation():
    net = _model()
    delta = [torch.zeros_like(p) for p in net.parameters()]
    obs = Observation.from_update(net, delta, lr=0.1, local_steps=5, input_shape=(1, 8, 8),
                                  num_classes=10, num_samples=4, local_batch_size=2, labels=[1, 2, 3, 4])
    assert obs.threat == "update" and obs.labels_known and obs.batch_size == 4
    with pytest.raises(ValueError):
        Observation.from_update(net, delta, lr=0.0, local_steps=5, input_shape=(1, 8, 8),
                                num_classes=10, num_samples=4)
    with pytest.raises(ValueError):
        Observation.from_gradients(net, delta[:-1], input_shape=(1, 8, 8), num_classes=10, batch_size=1)
    with pytest.raises(ValueError, match="threat"):
        build_attack("sme").reconstruct(
            Observation.from_gradients(net, delta, input_shape=(1, 8, 8), num_classes=10, batch_size=1))


def test_registry():
    assert {"dlg", "idlg", "ig", "dia", "sme"} <= set(attacks.ATTACKS)
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("nope")
