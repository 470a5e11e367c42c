"""Label recovery: iDLG, batch counts, analytic soft labels."""

import torch

from attacks import Observation
from attacks.case import build_case
from attacks.label_recovery import batch_label_counts, batch_labels, idlg_label, soft_label
from attacks.metrics import label_accuracy
from attacks.objective import batch_gradients, leaf_parameters


def test_idlg_label_single_image():
    for seed in range(10):
        case = build_case(model="lenet", dataset="digits", batch_size=1, seed=seed)
        assert int(idlg_label(case.observation)) == int(case.labels)


def test_batch_counts_small_batch():
    accs = []
    for seed in range(5):
        case = build_case(model="lenet", dataset="digits", batch_size=4, seed=seed)
        counts = batch_label_counts(case.observation)
        assert int(counts.sum()) == 4 and (counts >= 0).all()
        accs.append(label_accuracy(batch_labels(case.observation), case.labels))
    assert sum(accs) / len(accs) >= 0.95, accs
    # repeated labels are counted, not just detected
    case = build_case(model="lenet", dataset="digits", batch_size=8, seed=1)
    true = torch.bincount(case.labels, minlength=10)
    assert true.max() >= 2
    assert torch.equal(batch_label_counts(case.observation), true)


def test_labels_from_a_multistep_update():
    case = build_case(model="lenet", dataset="digits", batch_size=4, seed=0, threat="update",
                      local_steps=3, lr=0.01)
    assert label_accuracy(batch_labels(case.observation), case.labels) >= 0.75


def test_soft_label_smoothing_recovered():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=2)
    net = case.observation.model
    target = torch.full((1, 10), 0.01)
    target[0, int(case.labels)] = 0.91
    grads = batch_gradients(net, leaf_parameters(net), case.images, target, create_graph=False)
    obs = Observation.from_gradients(net, grads, input_shape=(1, 8, 8), num_classes=10, batch_size=1)
    assert torch.allclose(soft_label(obs), target, atol=1e-4)
    # mixup-style two-class label
    target = torch.zeros(1, 10)
    target[0, 2], target[0, 7] = 0.7, 0.3
    grads = batch_gradients(net, leaf_parameters(net), case.images, target, create_graph=False)
    obs = Observation.from_gradients(net, grads, input_shape=(1, 8, 8), num_classes=10, batch_size=1)
    assert torch.allclose(soft_label(obs), target, atol=1e-4)
