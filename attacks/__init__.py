"""Gradient-inversion attacks on what a federated client uploads.

Usable alone (torch, numpy, scipy only)::

    from attacks import Observation, build_attack
    obs = Observation.from_gradients(model, grads, input_shape=(3, 32, 32),
                                     num_classes=10, batch_size=1)
    rec = build_attack("ig", iterations=2000, seed=0).reconstruct(obs)
    rec.iterations, rec.stopped   # steps run; "converged" (attacks.stopping) or "budget"

Registry names: dlg, idlg, ig, dia, sme. Label recovery: ``attacks.label_recovery``.
Metrics: ``attacks.metrics``. Script: ``python -m attacks --help``.
"""

from .base import ATTACKS, Attack, Reconstruction, build_attack, register
from .observation import Observation
from . import dlg, inverting_gradients, dropout_inversion, sme  # noqa: F401  (register)

__all__ = ["ATTACKS", "Attack", "Observation", "Reconstruction", "build_attack", "register"]
