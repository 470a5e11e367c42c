"""A stale update made fresh by gradient inversion (``staleness: invert`` of FedBuff and FedAsync).

Wang and Gao, "Tackling the Unlimited Staleness in Federated Learning with Intertwined Data and Device
Heterogeneities", AAAI 2024 (arXiv:2309.13536; code github.com/pittisl/FL-with-intertwined-heterogeneity).
When slowness and data are intertwined (the slow clients hold classes the others lack), down-weighting a
stale update starves those classes, and applying it as it is moves the model by a direction computed at a
model long gone. Their server instead converts the stale update ``Delta_i`` (trained from ``w^{t-tau}``):

1. it estimates the client's data ``D_rec`` by gradient inversion: the images (and labels) whose local
   training from ``w^{t-tau}`` reproduces ``Delta_i`` (their code: Inverting Gradients' multi-step
   ``FedAvgReconstructor``, with the client's local steps and learning rate);
2. it runs the same local training on ``D_rec`` from the current global ``w^t``;
3. it aggregates that update in place of ``Delta_i``, as a fresh one.

Here step 1 is one of fedsim's registered attacks on the update threat (``invert_attack``, ``ig`` by
default) with ``invert_iterations`` as its budget, on the observation the audit builds for the same
update (``fedsim.audit.observer``): the model the client was sent, its learning rate, momentum and weight
decay, its sample count and its batch schedule (the server sent the seed it is drawn from); step 2 replays
the client's plain local SGD on the estimate (``attacks.objective.local_sgd_update``: the same steps,
batches, learning rate) from the current model. The attack's cost is server time: with ``invert_time:
wall`` its wall time is added to the virtual clock (``fedsim.run.async_rounds``).

Deviations from the paper, named: ``D_rec`` has the client's own sample count and batch schedule (their
code reconstructs a fixed 256 images and replays consecutive batches); the attack's objective is the
attack's own (IG: cosine distance, where their code uses an L1 distance); the paper's late switch back to
plain stale updates (their code decides it by comparing with the client's true fresh update, an oracle a
server does not have) is not implemented: ``invert_threshold`` alone decides; their sparsification of
the matched update and warm start of ``D_rec`` from a client's previous estimate are not implemented.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from strategies import TrainSettings
from strategies.asynchronous import AsyncParams, AsyncUpdate
from strategies.records import to_record, to_torch
from strategies.trainer import EpochShuffleSampler

INVERT_STREAM = 13  # the attack's seed per (step, client) (fedsim.world.build lists the streams)


@dataclass
class Inverted:
    """One conversion: the fresh update and what it cost."""

    update: AsyncUpdate
    wall_s: float       # the attack and the replay, measured
    iterations: int     # the attack's optimiser iterations


class StaleInversion:
    """The server's converter of stale updates (module docstring). ``new_model``: the run's architecture
    (weights are loaded from the arrays); the data's shape and class count for the attack."""

    def __init__(self, params: AsyncParams, new_model: Callable[[], nn.Module], input_shape: tuple[int, int, int],
                 num_classes: int, seed: int):
        self.params, self.new_model, self.seed = params, new_model, seed
        self.input_shape, self.num_classes = tuple(input_shape), num_classes

    def due(self, update: AsyncUpdate) -> bool:
        return update.staleness > self.params.invert_threshold

    def server_seconds(self, inverted: list[Inverted]) -> float:
        """The virtual server time these conversions take (``invert_time``): one after another."""
        how = self.params.invert_time
        if how == "none":
            return 0.0
        if how == "wall":
            return float(sum(i.wall_s for i in inverted))
        return float(how) * sum(i.iterations for i in inverted)

    def convert(self, update: AsyncUpdate, current: ArrayRecord, server_step: int) -> Inverted:
        """``update`` as the client would have sent it from ``current``, estimated by inversion."""
        from attacks import Observation, build_attack
        from attacks.objective import leaf_parameters, local_sgd_update

        started = time.perf_counter()
        pid = int(update.partition_id if update.partition_id is not None else -1)
        settings = TrainSettings.from_config(update.config, pid)
        n = int(update.num_examples)
        schedule = EpochShuffleSampler().schedule(n, settings)  # the server sent the seed it is drawn from
        model = self.new_model()
        model.load_state_dict(to_torch(update.sent))
        names = [name for name, _ in model.named_parameters()]
        stale = update.delta()
        obs = Observation.from_update(model, {k: stale[k].float() for k in names}, lr=settings.lr,
                                      local_steps=len(schedule), num_samples=n,
                                      local_batch_size=max(len(b) for b in schedule), schedule=schedule,
                                      momentum=settings.momentum, weight_decay=settings.weight_decay,
                                      input_shape=self.input_shape, num_classes=self.num_classes)
        seed = int(np.random.default_rng([self.seed, INVERT_STREAM, server_step, pid]).integers(2**31))
        attack = build_attack(self.params.invert_attack, seed=seed, iterations=self.params.invert_iterations,
                              **self.params.invert_config)
        rec = attack.reconstruct(obs)
        labels = rec.labels if rec.labels is not None else rec.hard_labels()
        # The same local training on the estimate, from the current model.
        now = self.new_model()
        base = to_torch(current)
        now.load_state_dict(base)
        fresh = local_sgd_update(now.eval(), leaf_parameters(now), rec.images, labels, lr=settings.lr,
                                 schedule=schedule, momentum=settings.momentum, weight_decay=settings.weight_decay,
                                 create_graph=False)
        delta = dict(zip(names, (d.detach().double() for d in fresh)))
        for k, d in stale.items():  # float buffers (BatchNorm statistics): not trained by SGD, kept as sent
            delta.setdefault(k, d)
        arrays = to_record({k: (v.double() + delta[k]).to(v.dtype) if k in delta else v for k, v in base.items()})
        content = RecordDict({"arrays": arrays, **{k: v for k, v in update.content.items() if k != "arrays"}})
        fresh_update = AsyncUpdate(content, current, 0, update.num_examples, update.config, update.partition_id)
        return Inverted(fresh_update, time.perf_counter() - started, int(rec.iterations))
