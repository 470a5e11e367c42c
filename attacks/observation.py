"""The threat model: what an honest-but-curious server observes of one client.

Breaching (Geiping et al., "Inverting Gradients - How easy is it to break privacy in
federated learning?", NeurIPS 2020, code ``breaching/cases``) separates the *case* (who
holds what, what travels) from the *attack* (how to reconstruct). This module is the
case side as data: an :class:`Observation` holds only things the server really has -
the model it sent with those parameters, the decoded upload (a single-batch gradient
or a multi-step weight update), the training settings it sent, the batch size, labels
if the threat model grants them, and the model's dropout rate. It never holds the
client's data; scoring against ground truth happens outside (``attacks.metrics``).

Conventions:
- images live in [0, 1] with shape (C, H, W); the model takes them as they are;
- ``gradients`` are d(mean cross-entropy over the batch)/d(parameter), one tensor per
  trainable parameter in ``model.named_parameters()`` order (or a dict by name);
- ``update`` is the weight delta ``w_after_local_training - w_sent``, same layout;
- local training (update threat) is ``local_steps`` steps of
  ``torch.optim.SGD(lr, momentum, weight_decay)`` with dampening 0 and no Nesterov,
  one buffer per parameter: d = g + weight_decay * w; buf = d on the first step,
  momentum * buf + d after; w -= lr * buf. ``momentum`` and ``weight_decay`` default
  to 0 (plain SGD); g is the gradient of the mean cross-entropy over the step's batch;
- which samples each step sees: ``schedule[t]`` holds the indices, into the client's
  ``num_samples`` samples, of step t's batch (an epoch-shuffling client gives e.g.
  ``[[2, 0], [1, 3]]``; the last batch of an epoch may be smaller). Samples are
  numbered as ``labels`` (and the attack's candidate batch) are ordered. Without a
  schedule, step t uses the consecutive slice ``[t*b, (t+1)*b)`` modulo
  ``num_samples`` with ``b = local_batch_size`` (the default that predates schedules);
  replaying an epoch-shuffling client that way put the simulated update 5-74%
  (relative L2) off its upload (digits LeNet clients of 4-10 samples, 2-3 epochs; 57-70%
  with momentum 0.9 left out), so pass what the server knows;
- ``support`` (optional): one bool tensor per parameter, the coordinates of the upload that
  travelled (a top-k or DGC reply carries only those; the rest decode to 0 without being
  zero in the client's update). Every matching loss then compares the simulated and the
  observed upload on those coordinates only (``attacks.objective.project``), and so does
  I2F; label recovery reads unsent entries as 0 (``attacks.label_recovery``). None: every
  coordinate travelled (dense, sign, TernGrad, sketches);
- ``wire`` and ``wire_map`` (optional, together): what travelled when it is a known linear
  map of the upload (a sketch ``y = S u`` with S from a seed the server shares): ``wire_map``
  takes the flattened upload (parameters in order) to the wire's space, differentiably, and
  the matching losses compare ``wire_map(simulated)`` with ``wire`` instead of the decoded
  upload (which stays in ``gradients``/``update`` for label recovery and SME's surrogate).

Depends on torch only.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

THREATS = ("gradient", "update")
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _as_list(values, names: list[str], what: str) -> list[torch.Tensor]:
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{what} is missing parameters: {', '.join(missing[:5])}")
        values = [values[n] for n in names]
    values = [torch.as_tensor(v, dtype=torch.float32).detach().clone() for v in values]
    if len(values) != len(names):
        raise ValueError(f"{what} has {len(values)} tensors, the model has {len(names)} parameters")
    return values


def _as_masks(values, names: list[str]) -> list[torch.Tensor]:
    """Per parameter, a bool tensor (a dict by name may hold other entries: BatchNorm's buffers)."""
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"support is missing parameters: {', '.join(missing[:5])}")
        values = [values[n] for n in names]
    masks = [torch.as_tensor(v).detach().clone() for v in values]  # dtype kept: validate() wants bool
    if len(masks) != len(names):
        raise ValueError(f"support has {len(masks)} masks, the model has {len(names)} parameters")
    return masks


@dataclass
class Observation:
    """What the server sees of one client for one round.

    Build it with :meth:`from_gradients` or :meth:`from_update`; both accept plain
    objects (a torch model or a state_dict plus a model, lists or dicts of tensors).
    """

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int
    gradients: list[torch.Tensor] | None = None
    update: list[torch.Tensor] | None = None
    lr: float = 0.0
    local_steps: int = 1
    local_batch_size: int | None = None
    num_samples: int | None = None
    labels: torch.Tensor | None = None
    dropout: float = 0.0
    data_range: tuple[float, float] = (0.0, 1.0)
    meta: dict = field(default_factory=dict)
    # Appended after ``meta`` so that positional construction keeps its meaning.
    schedule: list[torch.Tensor] | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    support: list[torch.Tensor] | None = None
    wire: torch.Tensor | None = None
    wire_map: object | None = None  # callable: flat upload -> wire space (linear, differentiable, picklable)

    # ------------------------------------------------------------------ builders
    @classmethod
    def _prepare(cls, model: nn.Module, state_dict) -> nn.Module:
        model = copy.deepcopy(model)
        if state_dict is not None:
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    @classmethod
    def from_gradients(
        cls,
        model: nn.Module,
        gradients: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        dropout: float = 0.0,
        support: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
        **meta,
    ) -> "Observation":
        """A single-batch gradient at the model's (or ``state_dict``'s) parameters."""
        return cls._build(model, state_dict, input_shape, num_classes, batch_size, labels, dropout, meta,
                          "gradients", gradients, support=support)

    @classmethod
    def from_update(
        cls,
        model: nn.Module,
        update: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        *,
        lr: float,
        local_steps: int,
        input_shape: Sequence[int],
        num_classes: int,
        num_samples: int,
        local_batch_size: int | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        dropout: float = 0.0,
        schedule: Sequence[Sequence[int] | torch.Tensor] | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        support: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
        wire: torch.Tensor | None = None,
        wire_map=None,
        **meta,
    ) -> "Observation":
        """A multi-step weight delta ``w_after - w_sent`` with the local SGD settings.

        ``schedule`` (one index batch per step), ``momentum`` and ``weight_decay``
        describe the client's training exactly when the server knows them (module
        docstring). With a schedule, ``local_batch_size`` defaults to its largest batch.
        ``support``: the coordinates that travelled, per parameter (module docstring).
        """
        if schedule is not None:
            # no dtype cast here: validate() rejects float indices rather than truncating them
            schedule = [torch.as_tensor(idx).detach().clone() for idx in schedule]
            local_batch_size = local_batch_size or max((len(idx) for idx in schedule), default=0)
        return cls._build(model, state_dict, input_shape, num_classes, num_samples, labels, dropout, meta,
                          "update", update, lr=float(lr), local_steps=int(local_steps),
                          local_batch_size=int(local_batch_size or num_samples), num_samples=int(num_samples),
                          schedule=schedule, momentum=float(momentum), weight_decay=float(weight_decay),
                          support=support, wire=None if wire is None else torch.as_tensor(wire).detach().clone(),
                          wire_map=wire_map)

    @classmethod
    def _build(cls, model, state_dict, input_shape, num_classes, batch_size, labels, dropout, meta,
               observed: str, tensors, support=None, **fields) -> "Observation":
        """Shared by the builders: ``observed`` names the field ("gradients" or "update") that
        ``tensors`` fills, matched to the model's parameters."""
        model = cls._prepare(model, state_dict)
        names = [n for n, _ in model.named_parameters()]
        fields[observed] = _as_list(tensors, names, observed)
        if support is not None:
            fields["support"] = _as_masks(support, names)
        obs = cls(model=model, input_shape=tuple(int(s) for s in input_shape),
                  num_classes=int(num_classes), batch_size=int(batch_size),
                  labels=None if labels is None else torch.as_tensor(labels, dtype=torch.int64),
                  dropout=float(dropout), meta=dict(meta), **fields)
        obs.validate()
        return obs

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """Where the observed model is: where an attack on this observation computes."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "Observation":
        """This observation on ``device``: the model, the upload, the support masks, the wire and the labels
        (the schedule's indices stay on the CPU; indexing moves them)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = (lambda ts: None if ts is None else [t.to(device) for t in ts])  # noqa: E731
        return dataclasses.replace(
            self, model=copy.deepcopy(self.model).to(device), gradients=move(self.gradients), update=move(self.update),
            support=move(self.support), wire=None if self.wire is None else self.wire.to(device),
            labels=None if self.labels is None else self.labels.to(device))

    # ------------------------------------------------------------------ views
    @property
    def threat(self) -> str:
        return "gradient" if self.gradients is not None else "update"

    @property
    def labels_known(self) -> bool:
        return self.labels is not None

    def parameters(self) -> dict[str, torch.Tensor]:
        """The parameters as the server sent them (detached)."""
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def upload(self) -> list[torch.Tensor]:
        return self.gradients if self.gradients is not None else self.update

    def support_fraction(self) -> float | None:
        """The fraction of the upload's coordinates that travelled (None: all of them)."""
        if self.support is None:
            return None
        return sum(int(m.sum()) for m in self.support) / sum(m.numel() for m in self.support)

    def last_linear(self) -> tuple[str, nn.Linear, int]:
        """(name, module, index of its weight in the parameter list) of the classifier."""
        names = [n for n, _ in self.model.named_parameters()]
        last = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                last = (name, module)
        if last is None:
            raise ValueError("the model has no linear layer to read labels from")
        prefix = f"{last[0]}." if last[0] else ""
        return last[0], last[1], names.index(prefix + "weight")

    def validate(self) -> None:
        if (self.gradients is None) == (self.update is None):
            raise ValueError("an observation holds either gradients or an update")
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.update is not None:
            if self.lr <= 0 or self.local_steps < 1:
                raise ValueError("an update needs lr > 0 and local_steps >= 1")
            if not 1 <= (self.local_batch_size or 0) <= (self.num_samples or 0):
                raise ValueError("need 1 <= local_batch_size <= num_samples")
            if not 0.0 <= self.momentum < 1.0:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
            if not self.weight_decay >= 0.0:  # also rejects NaN
                raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
            if self.schedule is not None:
                self._validate_schedule()
        for obs_t, (name, p) in zip(self.upload(), self.model.named_parameters()):
            if obs_t.shape != p.shape:
                raise ValueError(f"upload for {name} has shape {tuple(obs_t.shape)}, expected {tuple(p.shape)}")
        if self.labels is not None and self.labels.numel() != self.batch_size:
            raise ValueError("labels must have one entry per sample")
        if self.support is not None:
            self._validate_support()
        if (self.wire is None) != (self.wire_map is None):
            raise ValueError("wire and wire_map go together")
        if self.wire is not None:
            if self.support is not None:
                raise ValueError("an observation matches either a support or a wire, not both")
            d = sum(t.numel() for t in self.upload())
            mapped = self.wire_map(torch.zeros(d, device=self.wire.device))
            if self.wire.dim() != 1 or mapped.shape != self.wire.shape:
                raise ValueError(f"wire must be 1-D with wire_map's output shape {tuple(mapped.shape)}, "
                                 f"got {tuple(self.wire.shape)}")

    def _validate_support(self) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        if len(self.support) != len(names):
            raise ValueError(f"support has {len(self.support)} masks, the model has {len(names)} parameters")
        for mask, name, obs_t in zip(self.support, names, self.upload()):
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool:
                raise ValueError(f"support for {name} must be a bool mask, got {mask.dtype}")
            if mask.shape != obs_t.shape:
                raise ValueError(f"support for {name} has shape {tuple(mask.shape)}, expected {tuple(obs_t.shape)}")
        if not any(bool(torch.as_tensor(m).any()) for m in self.support):
            raise ValueError("support marks no coordinate: nothing travelled to match")

    def _validate_schedule(self) -> None:
        if len(self.schedule) != self.local_steps:
            raise ValueError(f"schedule has {len(self.schedule)} batches, local_steps is {self.local_steps}")
        for t, idx in enumerate(self.schedule):
            idx = torch.as_tensor(idx)  # a directly built Observation may hold lists
            # signed integers only: bool and uint8 would index as masks, floats be truncated
            if idx.dim() != 1 or idx.numel() == 0 or idx.dtype not in _INDEX_DTYPES:
                raise ValueError(f"schedule[{t}] must be a non-empty 1-D list of integer sample indices, "
                                 f"got {idx.dtype} of shape {tuple(idx.shape)}")
            if idx.numel() > self.local_batch_size:
                raise ValueError(f"schedule[{t}] has {idx.numel()} samples, more than "
                                 f"local_batch_size={self.local_batch_size}")
            if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
                raise ValueError(f"schedule[{t}] has indices outside [0, {self.num_samples}) "
                                 f"(num_samples): {idx.tolist()}")
