"""I2F (attacks.i2f): the exact inversion influence, against an explicit Jacobian and against DLG."""

import dataclasses
import math

import pytest
import torch

from attacks import build_attack
from attacks.case import build_case
from attacks.i2f import MAX_INPUTS, normal_matrix, predicted_psnr, reconstruction_shift, upload_function
from attacks.metrics import evaluate


def _noisy(tensors, variance, seed):
    gen = torch.Generator().manual_seed(seed)
    return [t + math.sqrt(variance) * torch.randn(t.shape, generator=gen) for t in tensors]


@pytest.mark.parametrize("threat", ["gradient", "update"])
def test_matrix_free_normal_matrix_and_shift_equal_the_explicit_jacobians(threat):
    kwargs = dict(threat="update", local_steps=2, lr=0.1, local_batch_size=1) if threat == "update" else {}
    case = build_case(model="lenet", dataset="digits", batch_size=2 if threat == "gradient" else 1, seed=0,
                      labels_known=True, **kwargs)
    obs = case.observation
    upload = upload_function(obs, obs.labels)
    flat = lambda x: torch.cat([t.reshape(-1) for t in upload(x)])  # noqa: E731
    # A column by column, by torch's own Jacobian-vector product
    basis = torch.eye(case.images.numel()).reshape(-1, *case.images.shape)
    jac = torch.stack([torch.autograd.functional.jvp(flat, case.images, e)[1] for e in basis], 1).double()
    normal, clean, _ = normal_matrix(upload, case.images, chunk=37)  # a chunk that does not divide d
    assert torch.allclose(normal, jac.T @ jac, rtol=1e-4, atol=1e-6 * float(normal.abs().max()))
    observed = _noisy(obs.upload(), 1e-6, 1)
    shift = reconstruction_shift(obs, case.images, obs.labels, observed, rcond=0.0)
    delta = (torch.cat([t.reshape(-1) for t in observed]) - clean).double()
    expected = torch.linalg.lstsq(jac, delta.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(shift.reshape(-1).double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_predicted_psnr_tracks_dlg_under_gradient_noise():
    """LeNet on an 8x8 digit: DLG's real PSNR under Gaussian noise on the gradient against I2F's
    prediction (measured 42.0/41.9, 26.1/26.1, 20.4/20.3, 8.6/9.5 dB at variance 1e-6..1e-3)."""
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0, labels_known=True)
    obs = case.observation
    for variance in (1e-5, 1e-4):
        noisy = _noisy(obs.gradients, variance, 0)
        predicted = predicted_psnr(obs, case.images, obs.labels, noisy)
        real = evaluate(build_attack("dlg", seed=0).reconstruct(dataclasses.replace(obs, gradients=noisy)).images,
                        case.images)["psnr"]
        assert abs(predicted - real) <= 1.5, (variance, predicted, real)


def test_no_perturbation_predicts_no_shift_and_big_inputs_are_refused():
    case = build_case(model="lenet", dataset="digits", batch_size=1, seed=0, labels_known=True)
    obs = case.observation
    assert predicted_psnr(obs, case.images, obs.labels, [g.clone() for g in obs.gradients]) is None or \
        predicted_psnr(obs, case.images, obs.labels) > 60
    with pytest.raises(ValueError, match=str(MAX_INPUTS)):
        reconstruction_shift(obs, torch.zeros(1, 1, 65, 64), obs.labels)
