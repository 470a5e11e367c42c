"""fedsim's Flower apps: the ServerApp and ClientApp that every engine runs unchanged.

The scenario reaches both through ``Context.run_config``: ``scenario-yaml`` (the resolved
scenario, set by fedsim's engines) or ``scenario`` (a path, as ``flwr run`` passes it from
``[tool.flwr.app.config]``). A ClientApp finds its data by ``node_config["partition-id"]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from strategies import ClientData, ServerSettings, TrainSettings, get_strategy

from .metered import MeteredGrid
from .progress import RoundProgress
from .records import to_record, to_torch
from .results import ResultsWriter
from .scenario import Scenario, load_scenario
from .world import World, world_from_text

# ----------------------------------------------------------------------------- client


def scenario_text(run_config: dict) -> str:
    if "scenario-yaml" in run_config:
        return str(run_config["scenario-yaml"])
    if "scenario" in run_config:
        path = Path(str(run_config["scenario"]))
        if not path.is_absolute() and not path.exists():
            path = Path(__file__).resolve().parents[1] / path  # relative to the app (FAB) root
        return load_scenario(path).to_yaml()
    raise KeyError("run_config has neither 'scenario-yaml' nor 'scenario'")


_models: dict[int, nn.Module] = {}


def _client_setup(context: Context) -> tuple[World, nn.Module, ClientData]:
    world = world_from_text(scenario_text(context.run_config))
    model = _models.get(id(world))
    if model is None:  # one model object per process, reloaded every call
        model = _models[id(world)] = world.new_model()
    pid = int(context.node_config["partition-id"])
    x, y, xv, yv = world.client_tensors(pid)
    return world, model, ClientData(pid, x, y, xv, yv)


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    world, model, data = _client_setup(context)
    model.load_state_dict(to_torch(msg.content["arrays"]))
    spec = get_strategy(world.scenario.strategy.name)
    algorithm = spec.client(world.scenario.strategy_params())
    settings = TrainSettings.from_config(msg.content["config"], data.partition_id)
    result = algorithm.train(model, data, settings, msg.content, context.state)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["num-examples"] = data.num_examples
    reply = RecordDict({"arrays": to_record(model.state_dict()), "metrics": MetricRecord(metrics),
                        **result.records})
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    _, model, data = _client_setup(context)
    model.load_state_dict(to_torch(msg.content["arrays"]))
    loss, acc = evaluate(model, data.x_val, data.y_val)
    metrics = MetricRecord({"loss": loss, "accuracy": acc, "num-examples": len(data.y_val)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return loss / len(y), correct / len(y)


# ----------------------------------------------------------------------------- server


def server_settings(s: Scenario) -> ServerSettings:
    t = s.train
    return ServerSettings(seed=s.seed, num_clients=s.data.num_clients, participation=t.participation,
                          sampling=t.sampling, lr=t.lr, lr_decay=t.lr_decay, local_epochs=t.local_epochs,
                          batch_size=t.batch_size, momentum=t.momentum, weight_decay=t.weight_decay)


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 0.5) -> None:
    """Round 1 starts only when every client node has connected."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            found = len(list(grid.get_node_ids()))
            raise TimeoutError(f"only {found} of {expected} client nodes connected within {timeout:.0f} s")
        time.sleep(poll)


def run_server(grid: Grid, scenario: Scenario, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the scenario's rounds on ``grid``, writing results to ``out_dir``; returns the summary."""
    logging.getLogger("flwr").setLevel(logging.ERROR)  # fedsim reports rounds and failures itself
    start = time.perf_counter()
    world = world_from_text(scenario.to_yaml())
    spec = get_strategy(scenario.strategy.name)
    strategy = spec.server(scenario.strategy_params(), server_settings(scenario))
    model = world.new_model()
    writer = ResultsWriter(out_dir, scenario.to_yaml())
    metered = MeteredGrid(grid)
    wait_for_nodes(metered, scenario.data.num_clients, scenario.engine.timeout_s)
    x_test, y_test = world.dataset.x_test, world.dataset.y_test
    initial: dict[str, float] = {}
    last = [time.perf_counter()]

    with RoundProgress(scenario.train.rounds, enabled=progress) as bar:

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(to_torch(arrays))
            loss, acc = evaluate(model, x_test, y_test)
            if server_round == 0:
                initial.update(accuracy=acc, loss=loss)
                return MetricRecord({"accuracy": acc, "loss": loss})
            now = time.perf_counter()
            row = {"round": server_round, "accuracy": acc, "loss": loss, **metered.take_round(),
                   "wall_s": now - last[0], "elapsed_s": now - start}
            row.update(strategy.round_report(server_round))
            last[0] = now
            writer.add_round(row)
            bar.advance(row)
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy.start(grid=metered, initial_arrays=to_record(model.state_dict()),
                       num_rounds=scenario.train.rounds, timeout=scenario.engine.timeout_s,
                       evaluate_fn=central_evaluate)

    rows = writer.rows
    summary = {
        "name": scenario.name,
        "accuracy": rows[-1]["accuracy"],
        "loss": rows[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "initial_accuracy": initial.get("accuracy"),
        "rounds": len(rows),
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "failures_total": sum(r["failures"] for r in rows),
        "wall_s": time.perf_counter() - start,
        "engine": scenario.engine.name,
        "scenario": scenario.model_dump(mode="json"),
    }
    writer.finish(summary, plot=scenario.output.plot)
    return summary


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from .scenario import scenario_from_text

    scenario = scenario_from_text(scenario_text(context.run_config))
    out_dir = context.run_config.get("out-dir") or scenario.output.dir or f"runs/{scenario.name}"
    progress = bool(context.run_config.get("progress", scenario.output.progress))
    run_server(grid, scenario, str(out_dir), progress=progress)
