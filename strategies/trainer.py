"""The one local-training loop every client algorithm uses.

A client algorithm (FedAvg's, SCAFFOLD's, FedSpeed's ...) decides *what* a step does; the
``LocalTrainer`` owns *which* batches it sees, the optimiser, the seeding and the step
count. Having one loop is what lets in-training defenses (DP-SGD wraps the optimiser and
the sampling) and the privacy audit (which must replay the exact batches) plug in once.

Seeding (unchanged from before the trainer existed, so every number is kept): the
client's seed for the round (``TrainSettings.seed``, derived from the scenario seed, the
round and the partition id) seeds the default torch generator (dropout masks draw from
it) and a separate generator for the sampler.

The batch schedule is a pure function of (number of samples, settings): the sampler
draws it up front and the trainer records it in ``schedule``. An auditor that knows the
round's settings and the client's sample count recomputes it without the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord
from torch import nn

from .sgd import LocalSGD

CLIENT_STREAM = 2  # the local-training stream of the scenario seed (see fedsim/world/build.py for the others)


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings, as read from the server's message config."""

    server_round: int
    lr: float
    local_epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    seed: int

    @classmethod
    def from_config(cls, config: ConfigRecord, partition_id: int) -> "TrainSettings":
        rnd = int(config["server-round"])
        return cls(rnd, float(config["lr"]), int(config["local-epochs"]), int(config["batch-size"]),
                   float(config["momentum"]), float(config["weight-decay"]),
                   client_seed(int(config["seed"]), rnd, partition_id))


def client_seed(scenario_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local training in one round, independent of who else trained."""
    return int(np.random.default_rng([scenario_seed, CLIENT_STREAM, server_round, partition_id]).integers(2**62))


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the generator dropout masks draw from: the default CPU generator, and ``device``'s own where
    the model computes elsewhere (a CUDA or MPS dropout draws there). (torch.manual_seed would also
    queue a lazy seeding of every CUDA device, recording a stack trace: ~1 ms a call.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU's generator and ``device``'s: draws inside leave the
    caller's random streams as they were."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return torch.random.fork_rng(devices=[index], device_type=device.type)


@dataclass
class ClientData:
    partition_id: int
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(len(self.y))


class EpochShuffleSampler:
    """``local_epochs`` passes, each a fresh seeded permutation cut into batches (last one partial)."""

    def schedule(self, num_samples: int, settings: TrainSettings) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(settings.seed)
        out = []
        for _ in range(settings.local_epochs):
            perm = torch.randperm(num_samples, generator=gen)
            out.extend(perm[start : start + settings.batch_size] for start in range(0, num_samples, settings.batch_size))
        return out


class LocalTrainer:
    """One client's local training: the batches in order, SGD, the step count and mean loss.

    Plain algorithms call ``run``. Algorithms whose step is more than one backward pass
    (FedSpeed's two SAM gradients, FedImpro's extra features) iterate ``batches()``, get
    gradients from ``gradient`` and finish each step with ``apply``.
    """

    def __init__(self, model: nn.Module, data: ClientData, settings: TrainSettings, sampler=None, private=None):
        self.model, self.data, self.settings = model, data, settings
        # DP-SGD (defenses.dp_sgd): its own (Poisson) sampler and Opacus's optimiser inside ``run``.
        self.private = private
        if private is not None:
            sampler = private.sampler()
        seed_dropout(settings.seed, data.x.device)
        self.schedule: list[torch.Tensor] = (sampler or EpochShuffleSampler()).schedule(data.num_examples, settings)
        self.params = list(model.parameters())
        self.optimizer = LocalSGD(self.params, lr=settings.lr, momentum=settings.momentum,
                                  weight_decay=settings.weight_decay)
        self.loss_sum, self.steps = 0.0, 0

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of every step, in the recorded order; the model in training mode."""
        if self.private is not None:  # validation refuses these strategies; never train non-privately
            raise RuntimeError("dp_sgd privatises only the trainer's plain run()")
        self.model.train()
        device = self.data.x.device  # the schedule is drawn on the CPU (same batches on every device)
        for idx in [i.to(device) for i in self.schedule]:  # one copy of the indices, before the first step
            yield self.data.x[idx], self.data.y[idx]

    def gradient(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """d loss / d parameters, without touching ``.grad``."""
        return list(torch.autograd.grad(loss, self.params))

    def apply(self, loss: torch.Tensor, grads: Sequence[torch.Tensor] | None = None) -> None:
        """One optimiser step with ``grads`` (or the ``.grad`` already set); ``loss`` is the step's
        data loss, for the reported mean."""
        if grads is not None:
            for p, g in zip(self.params, grads):
                p.grad = g
        self.optimizer.step()
        self.loss_sum += loss.item()
        self.steps += 1

    def step(self, loss: torch.Tensor, objective: torch.Tensor | None = None,
             before_step: Callable[[nn.Module], None] | None = None) -> None:
        """Backpropagate ``objective`` (default: ``loss``), optionally edit the gradients, step."""
        self.optimizer.zero_grad()
        (loss if objective is None else objective).backward()
        if before_step is not None:
            before_step(self.model)
        self.apply(loss)

    def run(self, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
            before_step: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
        """Plain local SGD on cross-entropy (plus ``extra_loss``); returns ``metrics()``."""
        if self.private is not None:
            return self.private.run(self, extra_loss, before_step)
        for x, y in self.batches():
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.step(loss, loss + extra_loss(self.model) if extra_loss is not None else None, before_step)
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        out = {"train_loss": self.loss_sum / max(self.steps, 1), "local_steps": float(self.steps)}
        if self.private is not None:  # the client's epsilon so far, its clipping fraction
            out.update(self.private.metrics)
        return out
