"""``dp_sgd``: sample-level DP-SGD inside every client's local training, by Opacus.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016: each step clips every per-sample gradient to L2 norm ``max_grad_norm``,
sums them, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides by the
expected batch size; the moments (RDP) accountant tracks the privacy spent.

Opacus does all of it: its ``GradSampleModule`` computes the per-sample gradients (mode
``grad_sample_mode``: hooks, functorch or expanded weights), ``DPOptimizer`` clips, noises and
scales, and its accountants (``rdp``, ``prv``, ``gdp``) give epsilon. fedsim adds only the
batch schedule and the seeding: Poisson sampling (every sample in a step's batch with
probability ``q = 1 / ceil(n / batch_size)``, ``ceil(n / batch_size)`` steps an epoch, as
Opacus's ``DPDataLoader``) drawn from stream 8 of the client's round seed, and the noise from
stream 9, so one scenario seed gives one run on every engine; an empty Poisson batch steps with
noise alone (Opacus's expanded-weights mode refuses a 0-sample forward: the step hands
``DPOptimizer`` empty per-sample gradients, and Opacus's own empty-batch branch clips nothing).
Clipping, summing, noise and scaling are Opacus's public ``DPOptimizer.pre_step`` (or, for ghost
clipping, ``DPLossFastGradientClipping`` and ``DPOptimizerFastGradientClipping``), never a copy;
fedsim subclasses ``DPOptimizer.clip_and_accumulate`` and the ghost module's
``get_clipping_coef`` only to count what they clip (the round's ``clip_fraction``) before handing
on to Opacus's own. With the same batches and generator the update is Opacus's own loop's, bit
for bit (tests/test_defenses.py). Not ``PrivacyEngine.make_private``: it replaces the data loader
(fedsim's seeded Poisson schedule would be lost) and picks the optimizer and module classes
itself (the counting subclasses cannot go in); fedsim wires the same public parts as it does.

Per client: the accountant's history ``(noise_multiplier, sample_rate, steps)`` lives in the
node's ``Context.state`` (a ConfigRecord) and Opacus's accountant is rebuilt from it every
round, so epsilon is the client's total over every round it trained in. Each participant
reports its epsilon; the server reports the largest over all clients so far.

With ``target_epsilon`` the client picks the noise multiplier with Opacus's
``get_noise_multiplier`` for its own sample rate and the largest number of steps it can take
(it trains in every round), so the target holds whatever sampling chooses.

Which strategies: those whose local step is the trainer's plain ``run`` (fedavg, fedprox,
scaffold, fedce). FedProx's proximal gradient and SCAFFOLD's correction are added to the
privatised gradient (both depend on no sample of this step). FedSpeed (two SAM gradients a
step) and FedImpro (a loss on synthetic features) are refused at validation.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .base import ClientDefense, Defense, DefenseSetting

POISSON_STREAM = 8   # Poisson batch sampling, derived from the client's round seed (fedsim/world/build.py)
DP_NOISE_STREAM = 9  # DP-SGD's gradient noise, likewise
STATE_KEY = "dp_sgd.accountant"


class DpSgdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["dp_sgd"] = "dp_sgd"
    noise_multiplier: float | None = Field(None, gt=0, description="noise std / max_grad_norm")
    target_epsilon: float | None = Field(None, gt=0, description="instead of noise_multiplier: epsilon after all rounds")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient L2 bound")
    poisson: bool = Field(True, description="Poisson sampling; false: shuffled fixed-size batches, accounted "
                          "as if Poisson (as Opacus does without poisson_sampling: an approximation)")
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    # How Opacus gets each sample's clipped gradient; every mode gives the same update (to float
    # rounding). hooks, functorch and ew (expanded weights) materialise per-sample gradients;
    # ghost (Opacus's fast gradient clipping, Li et al. ICLR 2022) computes only their norms,
    # exactly, for Linear and Embedding layers (other layers fall back to per-sample gradients),
    # then backpropagates the loss once more, each sample's term scaled by its clipping factor.
    # ew is the default: the fastest round measured on W1 and LeNet (benchmarks/dp_sgd_cost.py,
    # README "DP-SGD cost"; ghost's steps are cheaper on W1 alone, its rounds were not).
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost"] = "ew"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "DpSgdParams":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


def refusal(model: nn.Module) -> str | None:
    """Opacus's reason for not handling ``model`` (BatchNorm ...), or None."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    return "; ".join(str(e).splitlines()[0] for e in errors) if errors else None


# ----------------------------------------------------------------------------- server side


class DpSgdClient(ClientDefense):
    """The client half: Opacus on the ``LocalTrainer``, and the audit's gradient answer privatised alike."""

    def private_training(self, state: RecordDict) -> "PrivateTraining":
        return PrivateTraining(self.step, state)

    def private_gradient(self, model, x, y, config, num_examples, seed):
        from strategies.trainer import forked_rng, seed_dropout

        with forked_rng(x.device):
            seed_dropout(seed, x.device)
            model.train()
            return private_gradient(model, x, y, self.step, num_examples, int(config["batch-size"]),
                                    int(config["local-epochs"]),
                                    torch.Generator(device=x.device).manual_seed(seed + 1))  # Opacus draws there


class DpSgd(Defense):
    name = "dp_sgd"
    Params = DpSgdParams
    Client = DpSgdClient
    accounts_epsilon = True

    def __init__(self, params: DpSgdParams, setting: DefenseSetting):
        super().__init__(params, setting)
        self.rounds = setting.rounds
        self.epsilons: dict[int, float] = {}  # partition id -> epsilon so far

    @classmethod
    def check(cls, params: DpSgdParams, scenario: Any, at: tuple[str, ...]) -> None:
        """A strategy whose local step Opacus can privatise, and a model Opacus handles."""
        from strategies import get_strategy, strategy_names
        from strategies.rules import RuleViolation

        private = [n for n in strategy_names() if get_strategy(n).plain_local_step]
        if not get_strategy(scenario.strategy.name).plain_local_step:
            raise RuleViolation((*at, "name"), f"dp_sgd privatises the plain local SGD step of {', '.join(private)}; "
                                f"{scenario.strategy.name}'s step takes extra gradients (SAM, synthetic features) "
                                f"that Opacus cannot clip per sample")
        reason = refusal(scenario.nominal_model())
        if reason:
            raise RuleViolation(("model", "name"), f"dp_sgd: Opacus cannot train {scenario.model.name}: {reason}")

    def client_step(self) -> dict[str, Any]:
        return {**self.params.model_dump(), "rounds": self.rounds}

    def report_keys(self) -> tuple[str, ...]:
        return ("clip_fraction",)

    def on_round(self, record) -> None:
        self.round_eps, self.round_clip = {}, []
        for node in record.replies:
            m = node.reply.get("metrics")
            if m is not None and "dp-epsilon" in m:
                self.round_eps[node.partition_id] = float(m["dp-epsilon"])
                self.round_clip.append(float(m["dp-clip-fraction"]))
        self.epsilons.update(self.round_eps)

    def report(self) -> dict[str, Any]:
        if not self.epsilons:
            return {}
        return {"epsilon": max(self.epsilons.values()), "delta": self.params.delta,
                "epsilon_clients": {str(k): v for k, v in sorted(self.round_eps.items())},
                "clip_fraction": float(np.mean(self.round_clip)) if self.round_clip else None}


# ----------------------------------------------------------------------------- client side


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


class PoissonSampler:
    """``local_epochs * ceil(n / B)`` steps, each sample in a step with probability 1/ceil(n / B)."""

    def schedule(self, num_samples: int, settings) -> list[torch.Tensor]:
        k = steps_per_epoch(num_samples, settings.batch_size)
        rng = np.random.default_rng([settings.seed, POISSON_STREAM])
        u = rng.random((settings.local_epochs * k, num_samples))
        return [torch.from_numpy(np.flatnonzero(row < 1.0 / k)) for row in u]


class _ClipCount:
    """How many per-sample gradients Opacus's clipping scaled down (clipping factor below 1), of how
    many: the round's ``dp-clip-fraction``."""

    def __init__(self) -> None:
        self.clipped = self.seen = 0

    def add(self, factor: torch.Tensor) -> None:
        self.clipped += int((factor < 1.0).sum())
        self.seen += len(factor)

    @property
    def fraction(self) -> float:
        return self.clipped / self.seen if self.seen else 0.0


@functools.cache
def _counting_classes() -> tuple[type, type]:
    """Opacus's ``DPOptimizer`` and ghost-clipping ``GradSampleModuleFastGradientClipping``, each
    subclassed only to count what its clipping scales down. Built on first use: importing Opacus
    takes seconds, and the server and scenario validation never need it."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer

    class CountingDPOptimizer(DPOptimizer):
        """``DPOptimizer``, also counting the per-sample gradients its clipping scales down.

        Why a subclass: ``DPOptimizer.clip_and_accumulate`` keeps the per-sample clipping factors in
        a local variable; no public attribute, return value or hook gives them, and fedsim reports
        the fraction clipped. So this override of that public method takes the per-sample norms of
        the public ``grad_samples`` and counts the samples whose factor ``max_grad_norm / (norm +
        1e-6)`` is below 1 (Opacus's rule), then calls Opacus's own ``clip_and_accumulate``
        unchanged: the clipping and summing that make the update are Opacus's, never a copy
        (tests/test_defenses.py checks that it runs, every step, and that the count is the samples
        whose norm exceeds ``max_grad_norm``). The count is a metric only; its price is the
        per-sample norms taken a second time."""

        count: _ClipCount

        def clip_and_accumulate(self) -> None:
            samples = self.grad_samples
            if len(samples[0]):  # an empty Poisson batch clips nothing (Opacus's own empty-batch branch)
                norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
                self.count.add(self.max_grad_norm / (norms + 1e-6))
            super().clip_and_accumulate()

    class CountingGhostModule(GradSampleModuleFastGradientClipping):
        """Opacus's ghost-clipping module, counting the clipping factors it hands out.

        Why a subclass: ``DPLossFastGradientClipping.backward`` takes the factors from the public
        ``get_clipping_coef`` (once per backward) and keeps them; this override passes Opacus's
        factors through unchanged and counts those below 1."""

        count: _ClipCount

        def get_clipping_coef(self) -> torch.Tensor:
            coef = super().get_clipping_coef()
            self.count.add(coef)
            return coef

    return CountingDPOptimizer, CountingGhostModule


def _counting_dp_optimizer(sgd: torch.optim.Optimizer, count: _ClipCount, dp_settings: dict):
    """Opacus's ``DPOptimizer`` on ``sgd`` (``dp_settings``: its keyword arguments), counting into ``count``."""
    optimizer = _counting_classes()[0](sgd, **dp_settings)
    optimizer.count = count
    return optimizer


def _ghost_clipping(model: nn.Module, sgd: torch.optim.Optimizer, max_grad_norm: float, dp_settings: dict,
                    count: _ClipCount):
    """Opacus's fast gradient clipping, as ``PrivacyEngine.make_private(grad_sample_mode="ghost")`` sets it
    up: (the wrapped model, the optimizer, the batch loss whose ``backward()`` runs both passes).
    The module counts the samples whose clipping factor was below 1 into ``count``."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = _counting_classes()[1](model, batch_first=True, loss_reduction="mean",
                                 max_grad_norm=max_grad_norm, use_ghost_clipping=True)
    gsm.count = count
    optimizer = DPOptimizerFastGradientClipping(sgd, **dp_settings)
    criterion = DPLossFastGradientClipping(gsm, optimizer, nn.CrossEntropyLoss(), loss_reduction="mean")
    return gsm, optimizer, lambda x, y: criterion(gsm(x), y)


def load_accountant(state: RecordDict, mechanism: str):
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism)
    rec = state.get(STATE_KEY)
    if rec is not None:
        accountant.history = [(float(s), float(q), int(t)) for s, q, t in
                              zip(rec["noise"], rec["rate"], rec["steps"])]
    return accountant


def save_accountant(state: RecordDict, accountant) -> None:
    h = accountant.history
    state[STATE_KEY] = ConfigRecord({"noise": [float(s) for s, _, _ in h], "rate": [float(q) for _, q, _ in h],
                                     "steps": [int(t) for _, _, t in h]})


def noise_multiplier_for(p: DpSgdParams, sample_rate: float, total_steps: int) -> float:
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    return _searched_noise(p.target_epsilon, p.delta, sample_rate, total_steps, p.accountant)


@functools.lru_cache(maxsize=256)
def _searched_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's binary search (dozens of accountant evaluations), once per process per setting."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search's probes at large sigma hit the largest RDP order: noise
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))


def epsilon_of(accountant, delta: float) -> float:
    """The accountant's ``get_epsilon(delta)``. For RDP, the same arithmetic as Opacus's
    ``RDPAccountant.get_privacy_spent`` (``compute_rdp`` is the one-step RDP times the steps),
    with the one-step RDP cached: computing it costs ~0.25 s (fractional orders), every round,
    for every client, while (sample rate, noise) rarely change."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    if type(accountant) is not RDPAccountant or not accountant.history:
        return float(accountant.get_epsilon(delta=delta))
    orders = tuple(accountant.DEFAULT_ALPHAS)
    rdp = sum(_rdp_one_step(q, s, orders) * t for s, q, t in accountant.history)
    eps, _ = analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


class PrivateTraining:
    """One client's DP-SGD round: the trainer's ``run`` through Opacus."""

    def __init__(self, step: dict[str, Any], state: RecordDict):
        self.params = DpSgdParams.model_validate({k: v for k, v in step.items() if k != "rounds"})
        self.rounds, self.state = int(step["rounds"]), state
        self.metrics: dict[str, float] = {}

    def sampler(self):
        from strategies.trainer import EpochShuffleSampler

        return PoissonSampler() if self.params.poisson else EpochShuffleSampler()

    def run(self, trainer, extra_loss=None, before_step=None) -> dict[str, float]:
        from opacus.grad_sample.utils import wrap_model

        p, s, model = self.params, trainer.settings, trainer.model
        n = trainer.data.num_examples
        k = steps_per_epoch(n, s.batch_size)
        q = 1.0 / k
        sigma = noise_multiplier_for(p, q, self.rounds * s.local_epochs * k)
        accountant = load_accountant(self.state, p.accountant)
        # On the parameters' device: Opacus draws the noise there from this generator (its _generate_noise),
        # so the noise on a GPU is another draw of the same distribution than on the CPU.
        noise_gen = torch.Generator(device=trainer.params[0].device).manual_seed(
            int(np.random.default_rng([s.seed, DP_NOISE_STREAM]).integers(2**62)))
        # torch.optim.SGD, not LocalSGD: Opacus's DPOptimizer wraps a torch Optimizer (same update rule).
        sgd = torch.optim.SGD(trainer.params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        dp_settings = dict(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                           expected_batch_size=max(1, int(n * q)),  # as PrivacyEngine.make_private sets it
                           loss_reduction="mean", generator=noise_gen)
        clip_count = _ClipCount()
        if p.grad_sample_mode == "ghost":
            gsm, optimizer, batch_loss = _ghost_clipping(model, sgd, p.max_grad_norm, dp_settings, clip_count)
        else:
            gsm = wrap_model(model, p.grad_sample_mode, batch_first=True, loss_reduction="mean")
            optimizer = _counting_dp_optimizer(sgd, clip_count, dp_settings)

            def batch_loss(x, y):
                return nn.functional.cross_entropy(gsm(x), y)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))  # as PrivacyEngine does
        try:
            # Opacus's hooks on the first layer see an input that needs no gradient: harmless, said each step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            model.train()
            device = trainer.data.x.device  # the schedule is drawn on the CPU; its indices copied once
            for idx in [i.to(device) for i in trainer.schedule]:
                optimizer.zero_grad(set_to_none=True)
                if len(idx):
                    loss = batch_loss(trainer.data.x[idx], trainer.data.y[idx])
                    loss.backward()
                else:  # an empty Poisson batch: no per-sample gradients, the step is noise alone
                    for prm in trainer.params:  # (what a forward pass on 0 samples gives; ew refuses one)
                        prm.grad_sample = torch.zeros((0, *prm.shape), dtype=prm.dtype, device=prm.device)
                        prm.grad = torch.zeros_like(prm)  # ghost clipping's optimizer sums .grad
                if optimizer.pre_step():  # clip, sum, noise, scale; the accountant steps here
                    if extra_loss is not None:  # FedProx: data-independent, added after privatising
                        for prm, g in zip(trainer.params, torch.autograd.grad(extra_loss(model), trainer.params,
                                                                              allow_unused=True)):
                            if g is not None:
                                prm.grad.add_(g)
                    if before_step is not None:
                        before_step(model)
                    optimizer.original_optimizer.step()
                if len(idx):  # an empty batch has no loss to report
                    trainer.loss_sum += loss.item()
                trainer.steps += 1
        finally:
            optimizer.zero_grad(set_to_none=True)
            gsm.cleanup()  # the model object is reused by later (maybe non-private) calls in this process
            for prm in trainer.params:
                for attr in ("summed_grad", "grad_sample", "_norm_sample", "_forward_counter"):
                    if hasattr(prm, attr):
                        delattr(prm, attr)
        save_accountant(self.state, accountant)
        self.metrics = {"dp-epsilon": epsilon_of(accountant, p.delta), "dp-noise-multiplier": sigma,
                        "dp-clip-fraction": clip_count.fraction}
        return trainer.metrics()


def private_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: dict[str, Any], num_examples: int,
                     train_batch_size: int, local_epochs: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The audit's gradient query under DP-SGD: one step's privatised gradient on (x, y): per-sample
    gradients (Opacus's GradSampleModule) clipped to ``max_grad_norm``, summed, Gaussian noise of std
    ``sigma * max_grad_norm`` added (all three by Opacus's ``DPOptimizer.pre_step``, noise drawn from
    ``generator``), divided by the batch. ``sigma`` is the one this client trains with (from its
    training batch size and epochs when it is derived from ``target_epsilon``)."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    p = DpSgdParams.model_validate({k: v for k, v in step.items() if k != "rounds"})
    k = steps_per_epoch(num_examples, train_batch_size)
    sigma = noise_multiplier_for(p, 1.0 / k, int(step["rounds"]) * local_epochs * k)
    params = list(model.parameters())
    # One gradient, not a training loop: ghost clipping's two passes buy nothing here, and hooks
    # gives the same clipped sum.
    mode = "hooks" if p.grad_sample_mode == "ghost" else p.grad_sample_mode
    gsm = wrap_model(model, mode, batch_first=True, loss_reduction="sum")
    # Sum reduction: pre_step clips, sums and noises, and its scale_grad leaves the sum as it is; the
    # wrapped SGD never steps (it only hands DPOptimizer the parameters).
    try:
        optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                                expected_batch_size=None, loss_reduction="sum", generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        optimizer.pre_step()
        out = [prm.grad / len(y) for prm in params]
    finally:
        gsm.cleanup()  # hooks and Opacus's per-parameter attributes off the model
        for prm in params:
            prm.grad = None
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(prm, attr):
                    delattr(prm, attr)
    return {name: g.detach() for (name, _), g in zip(model.named_parameters(), out)}
