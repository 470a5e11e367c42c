"""DLG and iDLG: gradient matching by L-BFGS.

- DLG, Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019 (code ``dlg/main.py``):
  a dummy image and a dummy soft label (softmax of free logits), both from randn in the
  reference, optimised jointly with L-BFGS (lr 1, max_iter 20 per step, 300 steps) to
  minimise the summed squared L2 distance between dummy and observed gradients.
- iDLG, Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020: the
  label comes analytically from the last layer's gradient (``attacks.label_recovery``),
  then only the image is optimised.

With an observation's ``support`` (a sparsified gradient: the coordinates that travelled) the
squared L2 runs over those coordinates only.

What differs from the reference loop, and why (each is a constructor argument):
- restarts: L-BFGS diverges (NaN or a loss explosion) or stalls on some seeds; both are
  detected from the matching loss alone (never from ground truth) and the run restarts
  from a fresh seeded draw; the restart with the lowest loss is returned;
- the image starts from uniform [0, 1] (``init="uniform"``; the reference's randn puts
  the sigmoid net in saturation more often), and L-BFGS uses a strong-Wolfe line search
  (``line_search="strong_wolfe"``) which does not blow up on a bad curvature pair;
- the closure differentiates the loss only with respect to the candidates
  (``torch.autograd.grad``), not into the model's parameters;
- a convergence stop (``attacks.stopping``; ``stop_patience=0`` gives the reference's
  fixed 300 steps): an attempt ends once its loss has not improved by a relative
  ``stop_tol`` for ``stop_patience`` L-BFGS steps. A short patience is enough: on the
  experiment seeds (patches, 300 steps) the loss improved by more than 1e-3 at every step
  but one until it settled, then did not move again for the 150-220 steps left. The test
  is armed from ``stall_steps`` on, so that an attempt that settles early at a high loss
  is still restarted as stalled, as without the stop.
"""

from __future__ import annotations

import math

import torch

from .base import Attack, Reconstruction, register
from .label_recovery import batch_labels
from .objective import batch_gradients, leaf_parameters, observed_target, project, squared_l2
from .observation import Observation
from .stopping import ConvergenceStop, check_stop


@register("dlg")
class DLGAttack(Attack):
    """DLG with divergence/stall detection and restarts."""

    threats = ("gradient",)
    joint_label = True

    def __init__(
        self,
        *,
        steps: int = 300,
        max_iter: int = 20,
        lr: float = 1.0,
        restarts: int = 4,
        init: str = "uniform",
        line_search: str | None = "strong_wolfe",
        explode: float = 1e4,
        stall_steps: int = 30,
        stall_ratio: float = 1e-3,
        tol: float = 1e-12,
        stop_patience: int | None = 10,
        stop_tol: float = 1e-3,
        time_budget_s: float | None = None,
        seed: int = 0,
        callback=None,
    ):
        super().__init__(seed=seed, callback=callback)
        if init not in ("uniform", "randn"):
            raise ValueError("init must be uniform or randn")
        self.stop_patience, self.stop_tol = check_stop(stop_patience, stop_tol)
        self.steps, self.max_iter, self.lr = int(steps), int(max_iter), float(lr)
        self.restarts, self.init, self.line_search = int(restarts), init, line_search
        self.explode, self.stall_steps, self.stall_ratio = explode, int(stall_steps), stall_ratio
        self.tol, self.time_budget_s = tol, time_budget_s

    def _labels(self, obs: Observation) -> torch.Tensor | None:
        """Fixed labels, or None when they are optimised jointly (DLG)."""
        return obs.labels

    def _run(self, obs: Observation, gen: torch.Generator) -> Reconstruction:
        import time

        model, target = obs.model, observed_target(obs)
        params = leaf_parameters(model)
        fixed = self._labels(obs)
        shape = (obs.batch_size, *obs.input_shape)
        lo, hi = obs.data_range
        best, trace_all, total_it, start = None, [], 0, time.perf_counter()
        attempt = 0
        for attempt in range(self.restarts + 1):
            if self.init == "uniform":
                x = lo + (hi - lo) * torch.rand(shape, generator=gen)
            else:
                x = torch.randn(shape, generator=gen)
            x.requires_grad_(True)
            y = torch.randn(obs.batch_size, obs.num_classes, generator=gen).requires_grad_(True)
            leaves = [x] if fixed is not None else [x, y]
            opt = torch.optim.LBFGS(leaves, lr=self.lr, max_iter=self.max_iter,
                                    line_search_fn=self.line_search)

            def closure():
                labels = fixed if fixed is not None else torch.softmax(y, dim=-1)
                grads = batch_gradients(model, params, x, labels)
                loss = squared_l2(project(obs, grads), target)
                for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                    leaf.grad = g
                return loss.detach()

            trace: list[float] = []
            first = None
            status = "steps"
            stop = ConvergenceStop(self.stop_patience, self.stop_tol)
            for step in range(self.steps):
                loss = float(opt.step(closure))
                total_it += 1
                if first is None:
                    first = max(loss, 1e-30)
                trace.append(loss)
                if not math.isfinite(loss) or not torch.isfinite(x).all() or loss > self.explode * first:
                    status = "diverged"
                    break
                self._notify(total_it, x)
                if loss < self.tol:
                    status = "converged"
                    break
                if step + 1 == self.stall_steps and loss > self.stall_ratio * first:
                    status = "stalled"
                    break
                if stop.update(loss) and step + 1 >= self.stall_steps:
                    status = "plateau"
                    break
                if self.time_budget_s and time.perf_counter() - start > self.time_budget_s:
                    status = "time"
                    break
            trace_all.extend(trace)
            final = trace[-1] if trace and math.isfinite(trace[-1]) else math.inf
            if status != "diverged" and (best is None or final < best[0]):
                labels = fixed if fixed is not None else torch.softmax(y.detach(), dim=-1)
                best = (final, x.detach().clone(), labels.detach().clone(), status)
            if status in ("converged", "plateau", "steps", "time"):
                break
        if best is None:  # every attempt diverged: return the last iterate, sanitised
            labels = fixed if fixed is not None else torch.softmax(y.detach(), dim=-1)
            best = (math.inf, torch.nan_to_num(x.detach(), nan=0.5), labels, "diverged")
        # How the last attempt ended is what ended the attack (stalled or diverged there: restarts used up).
        stopped = "converged" if status in ("converged", "plateau") else "budget"
        return Reconstruction(images=best[1], labels=best[2], loss_trace=trace_all,
                              iterations=total_it, restarts=attempt, stopped=stopped,
                              extras={"status": best[3], "final_loss": best[0]})


@register("idlg")
class IDLGAttack(DLGAttack):
    """iDLG: analytic label (batch 1; batch counts otherwise), then DLG on the image."""

    joint_label = False

    def _labels(self, obs: Observation) -> torch.Tensor:
        return obs.labels if obs.labels is not None else batch_labels(obs)
