"""Inverting Gradients' learning-rate decay, with an optional move to the next rate at a plateau.

inversefed (Geiping et al., NeurIPS 2020, ``reconstruction_algorithms._run_trial``)
multiplies the learning rate by 0.1 at 3/8, 5/8 and 7/8 of the iteration budget
(``MultiStepLR``). That is ``StepDecay(optimizer, budget)`` here, and it reproduces
``torch.optim.lr_scheduler.MultiStepLR`` bit for bit (same products, same iterations,
including the milestones that coincide or fall on 0 for budgets under 8).

``plateau()`` is the deviation that lets the convergence stop save time: the loss of
signed Adam flattens at each rate long before the budget's milestone (measured on the
experiment configs: at lr 0.1 within 50-200 of the 225-750 iterations before the first
decay), so a stop that only truncates the budget's schedule either cuts off the decays
that refine the image or saves nothing. Moving to the next rate at a plateau makes a
phase end at its plateau or at its budget milestone, whichever comes first; the number
and size of the decays stay those of the reference.
"""

from __future__ import annotations

import torch

FRACTIONS = (3 / 8, 5 / 8, 7 / 8)
GAMMA = 0.1


class StepDecay:
    def __init__(self, optimizer: torch.optim.Optimizer, budget: int, enabled: bool = True,
                 milestones: list[int] | None = None):
        """``milestones`` replaces the budget's 3/8, 5/8, 7/8 (e.g. SME's code: budget // 2.667, // 1.6, // 1.142)."""
        self.optimizer = optimizer
        if milestones is None:
            milestones = [int(budget * f) for f in FRACTIONS]
        self.milestones = sorted(int(m) for m in milestones) if enabled else []
        self.done = 0  # decays applied so far
        self.epoch = 0
        self._decay_due()  # MultiStepLR applies a milestone at 0 on construction

    @property
    def remaining(self) -> int:
        """Decays still ahead; 0 means the run is at its final learning rate."""
        return len(self.milestones) - self.done

    def step(self) -> bool:
        """After each optimiser step, as MultiStepLR.step(); True if the rate changed."""
        self.epoch += 1
        return self._decay_due()

    def plateau(self) -> None:
        """Move to the next rate now; it takes the place of the next budget milestone."""
        if self.remaining:
            self.done += 1
            self._scale(GAMMA)

    def _decay_due(self) -> bool:
        count = 0
        while self.done < len(self.milestones) and self.milestones[self.done] <= self.epoch:
            self.done += 1
            count += 1
        if count:
            # MultiStepLR's arithmetic: lr * gamma ** (milestones at this epoch).
            self._scale(GAMMA ** count)
        return count > 0

    def _scale(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
