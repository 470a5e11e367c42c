"""How well ``staleness: invert`` converts a slow client's stale update in the sweep's setting
(experiments/async/RESULTS.md): the cosine distance to the update that client would have sent from the
current model, of its stale update and of the inverted one at several attack budgets: the cosine
distance (direction) and the relative L2 error ||u - fresh|| / ||fresh|| (direction and size).

    .venv/bin/python experiments/async/probe.py

The case: base.yaml's world (seed 0), slow client 2 (64 training samples of class 9, 5 local steps of batch 16,
lr 0.1); the global model it was sent is the model after ``warm`` synchronous FedAvg rounds of the fast
clients, and the current model ``stale`` rounds later (about the staleness the sweep's slow updates have).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from attacks.objective import cosine_distance, leaf_parameters, local_sgd_update
from fedsim.run.stale_inversion import StaleInversion
from fedsim.scenario.schema import load_scenario
from fedsim.world.build import world_from_text
from strategies import TrainSettings
from strategies.asynchronous import AsyncParams, AsyncUpdate
from strategies.base import ServerSettings, client_config
from strategies.records import to_record
from strategies.trainer import EpochShuffleSampler

SLOW, FAST = 2, [1, 3, 4, 6, 8, 9, 10, 11, 12, 13]


def local(model, x, y, settings) -> list[torch.Tensor]:
    schedule = EpochShuffleSampler().schedule(len(y), settings)
    return [d.detach() for d in local_sgd_update(model, leaf_parameters(model), x, y, lr=settings.lr,
                                                 schedule=schedule, create_graph=False)]


def relative_error(u: list[torch.Tensor], fresh: list[torch.Tensor]) -> float:
    return float(sum((a - b).pow(2).sum() for a, b in zip(u, fresh)).sqrt() / sum(b.pow(2).sum() for b in fresh).sqrt())


def fedavg_round(model, world, server_round: int) -> None:
    deltas = []
    for pid in FAST:
        x, y = world.client_tensors(pid)[:2]
        config = ConfigRecord(client_config(ServerSettings(seed=0, num_clients=20, lr=0.1, local_epochs=1,
                                                           batch_size=16), server_round))
        deltas.append(local(model, x, y, TrainSettings.from_config(config, pid)))
    with torch.no_grad():
        for p, *ds in zip(model.parameters(), *deltas):
            p.add_(torch.stack(ds).mean(0))


def main(warm: int = 5, stale: int = 3) -> None:
    torch.set_num_threads(1)
    scenario = load_scenario("experiments/async/base.yaml")
    world = world_from_text(scenario.to_yaml())
    old = world.new_model()
    for r in range(1, warm + 1):
        fedavg_round(old, world, r)
    current = world.new_model()
    current.load_state_dict(old.state_dict())
    for r in range(warm + 1, warm + stale + 1):
        fedavg_round(current, world, r)
    x, y = world.client_tensors(SLOW)[:2]
    config = ConfigRecord(client_config(ServerSettings(seed=0, num_clients=20, lr=0.1, local_epochs=1, batch_size=16),
                                        warm + 1))
    settings = TrainSettings.from_config(config, SLOW)
    stale_delta, fresh = local(old, x, y, settings), local(current, x, y, settings)
    names = [n for n, _ in old.named_parameters()]
    mine = to_record({k: v + dict(zip(names, stale_delta))[k] for k, v in old.state_dict().items()})
    update = AsyncUpdate(RecordDict({"arrays": mine, "metrics": MetricRecord({"num-examples": len(y)})}),
                         to_record(old.state_dict()), stale, float(len(y)), config, SLOW)
    print(f"client {SLOW}: {len(y)} samples, classes {sorted(set(y.tolist()))}; staleness {stale} after {warm} rounds")
    print("| update | cosine distance to the fresh update | relative L2 error | wall s |\n|---|---|---|---|")
    print(f"| stale, as sent | {float(cosine_distance(stale_delta, fresh)):.4f} | "
          f"{relative_error(stale_delta, fresh):.3f} | - |")
    ds = world.dataset
    for iterations in (50, 100, 200, 400):
        params = AsyncParams(concurrency=10, staleness="invert", invert_threshold=0, invert_iterations=iterations,
                             invert_config={"label_assignment": "sorted"})
        inversion = StaleInversion(params, world.new_model, (ds.channels, ds.image_size, ds.image_size),
                                   ds.num_classes, scenario.seed)
        started = time.perf_counter()
        out = inversion.convert(update, to_record(current.state_dict()), warm + stale + 1)
        delta = out.update.delta()
        inverted = [delta[k].float() for k in names]
        print(f"| inverted, {iterations} iterations | {float(cosine_distance(inverted, fresh)):.4f} | "
              f"{relative_error(inverted, fresh):.3f} | {time.perf_counter() - started:.2f} |")


if __name__ == "__main__":
    main()
