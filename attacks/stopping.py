"""Convergence stop shared by the optimisation attacks: end a run once its objective stalls.

The reference loops run a fixed budget and never look at the loss to stop: DLG (Zhu et
al., NeurIPS 2019, ``dlg/main.py``) takes 300 L-BFGS steps; inversefed and breaching
(Geiping et al., NeurIPS 2020, ``_run_trial``) take ``max_iterations`` Adam steps and
break early only on a non-finite loss. A user then pays the whole budget even when the
objective stopped moving long before. This rule ends a run when the objective (the
gradient-matching loss with its priors, e.g. TV, exactly what the optimiser minimises)
has not improved on its best value by a relative ``tol`` for ``patience`` consecutive
iterations - the plateau test of Keras' EarlyStopping and torch's ReduceLROnPlateau
(``threshold_mode="rel"``). Comparing with the best value seen, not the previous one,
makes the test robust to the non-monotone loss of signed Adam, and lets slow but steady
progress reset the count once it adds up to ``tol``.

The iteration budget stays a hard cap, and anything tied to it (a learning-rate schedule)
stays defined by the budget: the stop only cuts a run short, so a stopped run is a prefix
of the full-budget run. ``patience`` 0 or None turns the stop off (the fixed budget).
"""

from __future__ import annotations

import math
import numbers


def check_stop(patience, tol) -> tuple[int, float]:
    """Validated ``(patience, tol)``; ``patience`` None becomes 0 (off)."""
    if patience is None:
        patience = 0
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
        raise ValueError(f"stop_patience must be an integer >= 0 (0 or null: no convergence stop), "
                         f"got {patience!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"stop_tol must be a finite number >= 0, got {tol!r}")
    return int(patience), float(tol)


class ConvergenceStop:
    """Plateau test on one optimisation run; make a new one per run (restart)."""

    def __init__(self, patience: int | None, tol: float):
        self.patience, self.tol = check_stop(patience, tol)
        self.best = math.inf
        self.stale = 0  # iterations since the best value last improved by tol

    def update(self, loss: float) -> bool:
        """Record this iteration's objective; True once the run has converged."""
        if not self.patience:
            return False
        if math.isfinite(self.best):
            improved = loss < self.best - self.tol * abs(self.best)
        else:  # the first finite loss is an improvement (inf - tol * inf would be nan)
            improved = math.isfinite(loss)
        if improved:
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience
