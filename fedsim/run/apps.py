"""fedsim's Flower apps: the ServerApp and ClientApp that every engine runs unchanged.

The scenario reaches both through ``Context.run_config``: ``scenario-yaml`` (the resolved
scenario, set by fedsim's engines) or ``scenario`` (a path, as ``flwr run`` passes it from
``[tool.flwr.app.config]``). A ClientApp finds its data by ``node_config["partition-id"]``, or in
its own files at ``node_config["data-path"]`` (``fedsim.deploy.node_data``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
import weakref
from collections import UserDict
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
import torch
from torch import nn

from defenses import build_defenses
from defenses.client import client_defenses, defend_upload, private_training, reply_metrics, wrap_call
from strategies import ClientData, ClientJob, ServerSettings, TrainSettings, get_strategy
from strategies.base import client_config, fixed_sample_size
from strategies.compression import CodecContext, get_codec
from strategies.records import to_record, to_torch

from . import checkpoint
from ..audit.observer import AuditObserver
from ..audit.query import QUERY_GRADIENT, answer_gradient_query
from .async_rounds import AsyncState, run_async
from .clock import VirtualClock
from .metered import MeteredGrid
from .observers import (CentralEvaluation, CodecReport, DefenseReport, FailureWatch, ProgressObserver, ResultsObserver,
                        RoundTiming, StrategyReport, evaluate)
from .progress import RoundProgress
from .results import ResultsWriter
from .rounds import run_rounds
from ..scenario.schema import Scenario, load_scenario
from ..trackers import build_trackers
from ..world.build import MAX_WORLDS, World, world_from_text
from ..world.system import SystemModel, SystemModelError
from ..world.device import use_device

# ----------------------------------------------------------------------------- client


def scenario_text(run_config: dict) -> str:
    if "scenario-yaml" in run_config:
        return str(run_config["scenario-yaml"])
    if "scenario" in run_config:
        path = Path(str(run_config["scenario"]))
        if not path.is_absolute() and not path.exists():
            path = Path(__file__).resolve().parents[2] / path  # relative to the app (FAB) root
        return load_scenario(path).to_yaml()
    raise KeyError("run_config has neither 'scenario-yaml' nor 'scenario'")


class _ThreadModels(threading.local, UserDict):
    """A dict of its own in every thread: the calling thread's models."""


# One model object per World per thread, reloaded every call; by id(world), checked against a
# weak reference (an id can be reused once its World is gone), at most MAX_WORLDS as the Worlds.
# Per thread, not per process: a call the inline engine gives up on (engine.timeout_s) runs on in
# its own thread, training its model in place, while every later call runs on another thread
# (fedsim.engines.inline), so on another model object; a thread's models go with the thread.
_models: dict[int, tuple[weakref.ref, nn.Module]] = _ThreadModels()


def _model_of(world: World, device: torch.device) -> nn.Module:
    entry = _models.get(id(world))
    if entry is None or entry[0]() is not world or next(entry[1].parameters()).device != device:
        _models.pop(id(world), None)
        entry = _models[id(world)] = (weakref.ref(world), world.new_model().to(device))
        while len(_models) > MAX_WORLDS:
            del _models[next(iter(_models))]
    return entry[1]


def deployed_threads(run_config: dict, scenario_yaml: str) -> None:
    """Under `flwr run` each app process starts at torch's default thread count; fedsim's engines run the
    server and every client at ``engine.torch_threads``. Float reductions (a matmul's, the evaluation's
    sums) depend on the thread count, so a deployed run gives the simulated run's metrics only at the
    same count: set it here, where fedsim's engines have not."""
    if "scenario-yaml" in run_config:
        return  # one of fedsim's engines: it set the count for this process
    import torch

    from ..scenario.schema import scenario_from_text

    threads = scenario_from_text(scenario_yaml).engine.torch_threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=MAX_WORLDS)
def scenario_device(scenario_yaml: str) -> torch.device:
    """``engine.device`` as this process resolves it (``auto``: what torch sees here; fedsim.world.device)."""
    from ..scenario.schema import scenario_from_text

    return use_device(scenario_from_text(scenario_yaml).engine.device)


def _client_setup(context: Context) -> tuple[World, nn.Module, ClientData]:
    """The node's world, its model on the run's device and its data moved there: once per client call,
    so a step indexes tensors already on the device."""
    text = scenario_text(context.run_config)
    deployed_threads(context.run_config, text)
    world = world_from_text(text)
    device = scenario_device(text)
    model = _model_of(world, device)
    pid = int(context.node_config["partition-id"])
    if "data-path" in context.node_config:  # the node's own files (fedsim.deploy.node_data)
        from ..deploy.node_data import local_tensors

        x, y, xv, yv = local_tensors(world, str(context.node_config["data-path"]), pid)
    else:
        x, y, xv, yv = world.client_tensors(pid)
    return world, model, ClientData(pid, *(t.to(device) for t in (x, y, xv, yv)))


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Train as the message says: every setting (strategy, its hyperparameters, codec, defenses) is
    read from the message config; the scenario copy only gives this node its data and model.

    The update goes through the transforms the config lists, in order: the client defenses'
    (``defenses.client``: an in-training hook, update transforms, wrappers of this whole call such
    as Flower's clipping mods), then the codec's encoding."""
    config = msg.content["config"]
    defenses = client_defenses(config)
    return wrap_call(lambda m, c: _train(m, c, defenses), defenses, config)(msg, context)


def _train(msg: Message, context: Context, defenses: list) -> Message:
    _, model, data = _client_setup(context)
    config = msg.content["config"]
    spec = get_strategy(str(config["strategy"]))
    algorithm = spec.client(spec.params.model_validate_json(str(config["strategy-params"])))
    sent = to_torch(msg.content["arrays"], data.x.device)  # on the device: the client rules subtract it there
    model.load_state_dict(sent)
    job = ClientJob(model, data, TrainSettings.from_config(config, data.partition_id), msg.content,
                    context.state, sent, private=private_training(defenses, context.state))
    upload = algorithm.train(job)
    return train_reply(msg, context, upload, defenses, data)


def train_reply(msg: Message, context: Context, upload, defenses: list, data: ClientData) -> Message:
    """The reply to a training message once local training made ``upload``: the update defenses, the
    codec (with the node's ``Context.state``), the metrics. Every engine's; the vectorized engine calls
    it per client after training a round's clients together."""
    config = msg.content["config"]
    defense_metrics = defend_upload(upload, defenses, config, data.partition_id)  # before the codec
    codec = get_codec(str(config["codec"]), str(config.get("codec-params", "{}")))
    ctx = CodecContext(seed=int(config.get("codec-seed", 0)), server_round=int(config["server-round"]),
                       client=data.partition_id)
    reply = codec.encode(upload, context.state, ctx)
    metrics = {**{k: float(v) for k, v in upload.metrics.items()}, **defense_metrics,
               "num-examples": data.num_examples, **reply_metrics(defenses, config)}
    reply["metrics"] = MetricRecord(metrics)
    reply["fedsim"] = ConfigRecord({"partition-id": data.partition_id})
    return Message(reply, reply_to=msg)


@client_app.query(QUERY_GRADIENT)
def client_audit_gradient(msg: Message, context: Context) -> Message:
    """The audit's gradient threat: one batch gradient at the sent model (fedsim.audit)."""
    _, model, data = _client_setup(context)
    return Message(answer_gradient_query(msg.content, model, data.x, data.y, data.partition_id), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    _, model, data = _client_setup(context)
    model.load_state_dict(to_torch(msg.content["arrays"]))
    loss, acc = evaluate(model, data.x_val, data.y_val)
    metrics = MetricRecord({"loss": loss, "accuracy": acc, "num-examples": len(data.y_val)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- server


def server_settings(s: Scenario) -> ServerSettings:
    return ServerSettings(**s.train.model_dump(), seed=s.seed, num_clients=s.data.num_clients,
                          strategy=s.strategy.name, strategy_params=s.strategy_params().model_dump_json(),
                          codec=s.upload_codec(), codec_params=s.upload_params().model_dump_json())


def virtual_clock(scenario: Scenario, world: World) -> VirtualClock | None:
    """The run's virtual clock over its clients' devices (docs/time.md), or None without a system section."""
    if scenario.system == "none":
        return None
    import numpy as np

    from ..scenario.schema import ScenarioError

    labels = world.dataset.y_train.numpy()
    counts = np.stack([np.bincount(labels[part], minlength=world.dataset.num_classes) for part in world.parts])
    try:
        system = SystemModel.build(scenario.system, scenario.data.num_clients, scenario.seed, counts)
    except SystemModelError as exc:
        raise ScenarioError(f"system.{exc}") from None
    return VirtualClock(system, scenario.train.deadline_s)


def stale_inversion(scenario: Scenario, world: World):
    """The converter of stale updates when the asynchronous strategy inverts them (``staleness: invert``), or None."""
    params = scenario.strategy_params()
    if getattr(params, "staleness", None) != "invert":
        return None
    from .stale_inversion import StaleInversion

    ds = world.dataset
    return StaleInversion(params, world.new_model, (ds.channels, ds.image_size, ds.image_size), ds.num_classes,
                          scenario.seed)


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 0.5) -> None:
    """Round 1 starts only when every client node has connected."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            found = len(list(grid.get_node_ids()))
            raise TimeoutError(f"only {found} of {expected} client nodes connected within {timeout:.0f} s")
        time.sleep(poll)


def run_server(grid: Grid, scenario: Scenario, out_dir: str | Path, progress: bool = True,
               ground_truth: bool = True, resume: bool = False, tracking: dict | None = None) -> dict:
    """Run the scenario's rounds on ``grid``, writing results to ``out_dir``; returns the summary.

    ``ground_truth``: whether this process may score the audit against clients' data (fedsim's
    own engines); a deployed server has none. ``resume``: continue the run in ``out_dir`` from its
    checkpoint (``fedsim.run.checkpoint``; raises CheckpointError without a usable one). ``tracking``: where
    the scenario's trackers report, from a sweep (``fedsim.trackers.open_sweep``)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)  # fedsim reports rounds and failures itself
    start = time.perf_counter()
    world = world_from_text(scenario.to_yaml())
    spec = get_strategy(scenario.strategy.name)
    settings = server_settings(scenario)
    strategy = spec.server(scenario.strategy_params(), settings)
    model = world.new_model()
    clock = virtual_clock(scenario, world)  # before anything is written: a bad trace is bad input
    async_state = AsyncState() if getattr(strategy, "asynchronous", False) else None  # fedsim.run.async_rounds
    ckpt = checkpoint.load(out_dir, scenario.to_yaml()) if resume else None
    writer = ResultsWriter(out_dir, scenario.to_yaml(),
                           rows=checkpoint.kept_rows(out_dir, ckpt.server_round) if ckpt else None)
    metered = MeteredGrid(grid)
    wait_for_nodes(metered, scenario.data.num_clients, scenario.engine.timeout_s)
    evaluation = CentralEvaluation(model, world.dataset.x_test, world.dataset.y_test,
                                   device=use_device(scenario.engine.device))
    sampled = fixed_sample_size(scenario.data.num_clients, scenario.train.participation)
    defenses, train_config = build_defenses(scenario.defenses(), scenario.data.num_clients, sampled, scenario.seed,
                                            scenario.train.rounds)
    codec = get_codec(scenario.upload_codec(), scenario.upload_params())
    running = strategy
    for defense in defenses:
        running = defense.wrap_server(running)
    canaries = None
    if scenario.privacy != "none":
        from ..privacy.run import CanaryRun  # here: its estimator imports scipy.stats (seconds), only for this

        canaries = CanaryRun(scenario, scenario.train.rounds)
    if canaries is not None:  # outside the DP wrappers: their noise is additive (fedsim.privacy.run)
        running = canaries.wrap(running)
    arrays, first_round = to_record(model.state_dict()), 1
    if ckpt is not None:  # the server objects as the checkpoint left them (built above only for train_config)
        strategy, running, defenses, codec = (ckpt.server[k] for k in ("strategy", "running", "defenses", "codec"))
        arrays, first_round = ckpt.arrays, ckpt.server_round + 1
        ckpt.restore_nodes(grid.contexts)
        start -= ckpt.elapsed_s  # wall_s and elapsed_s go on from the checkpoint's

    # The audit asks clients through the plain grid: its queries are not training traffic.
    # The audit's gradient query carries the round's training settings and the client-side defense steps
    # too: the answer is defended as an upload of that round would be.
    def query_config(server_round: int) -> dict:
        return {**client_config(settings, server_round), **train_config,
                **{k: v for d in defenses for k, v in d.query_config().items()}}

    audit = (AuditObserver(scenario, world, grid, out_dir, scenario.engine.timeout_s, ground_truth,
                           query_config=query_config)
             if scenario.audit != "none" else None)
    trackers = build_trackers(scenario, out_dir, lambda: audit.rows if audit else [], tracking)

    failures = FailureWatch()
    observers: list = []  # the round's observers, in order (below)

    def server_state(record) -> dict:  # what the checkpoint holds beyond node states (fedsim.run.checkpoint)
        return {"arrays": record.arrays,
                "server": {"strategy": strategy, "running": running, "defenses": defenses, "codec": codec},
                "observers": {o.state_key: o.state_dict() for o in observers if o.state_key}}

    # Only an engine of fedsim's own holds the nodes' Context.state; under `flwr run` it lives on the
    # SuperNodes, out of a server checkpoint's reach, so a deployed run writes none.
    checkpointer = (checkpoint.Checkpointer(Path(out_dir), scenario.output.checkpoint_every, scenario.train.rounds,
                                            scenario.to_yaml(), grid.contexts, server_state, start)
                    if scenario.output.checkpoint_every and hasattr(grid, "contexts") else None)
    if checkpointer is not None and ckpt is not None:
        checkpointer.resume_from(ckpt)
    with RoundProgress(scenario.train.rounds, enabled=progress, completed=first_round - 1) as bar:
        observers[:] = [evaluation, RoundTiming(start), StrategyReport(strategy), *map(DefenseReport, defenses),
                        *([CodecReport(codec)] if scenario.upload_codec() != "none" else []),
                        *([clock] if clock else []), *([async_state] if async_state else []),
                        *([audit] if audit else []), *([canaries.observer] if canaries else []),
                        ResultsObserver(writer), *trackers, ProgressObserver(bar), failures,
                        *([checkpointer] if checkpointer else [])]  # last: after every observer saw the round
        if ckpt is not None:  # each observer's state as the checkpoint left it (the audit resubmits its jobs)
            for observer in observers:
                if observer.state_key and observer.state_key in ckpt.observers:
                    observer.load_state_dict(ckpt.observers[observer.state_key])
        try:
            if async_state is not None:  # completions in virtual-time order, each server step a record
                run_async(running, metered, codec, arrays, scenario.train.rounds, scenario.engine.timeout_s,
                          observers, clock, async_state, scenario.seed, ConfigRecord(train_config),
                          first_step=first_round, inversion=stale_inversion(scenario, world))
            else:
                run_rounds(running, metered, codec, arrays, scenario.train.rounds, scenario.engine.timeout_s,
                           observers, ConfigRecord(train_config), first_round=first_round, clock=clock)
        except BaseException as exc:  # Ctrl-C too: a tracker marks its run stopped (a resume reopens it)
            for tracker in trackers:
                with contextlib.suppress(Exception):  # best effort: the run's own error is the one to report
                    tracker.stopped(exc)
            raise
        finally:
            if audit is not None:
                audit.close()  # the run waits for the last attack

    rows = writer.rows
    summary = {
        "name": scenario.name,
        "accuracy": rows[-1]["accuracy"],
        "loss": rows[-1]["loss"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "initial_accuracy": evaluation.initial.get("accuracy"),
        "rounds": len(rows),
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "failures_total": sum(r["failures"] for r in rows),
        "failure_reasons": failures.reasons,  # distinct reason -> how many client-rounds it failed
        **(clock.summary() if clock else {}),
        "wall_s": time.perf_counter() - start,
        "engine": scenario.engine.name,
        "scenario": scenario.model_dump(mode="json"),
        **(audit.summary() if audit else {}),
        **{k: v for d in defenses for k, v in d.summary(rows).items()},
        **(canaries.summary() if canaries else {}),
    }
    writer.finish(summary, plot=scenario.output.plot, audit_rows=audit.rows if audit else None)
    for tracker in trackers:  # after summary.json and the plots: trackers report the run's files
        tracker.finish(summary)
    if checkpointer is not None:
        checkpointer.remove()
    return summary


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from ..scenario.schema import scenario_from_text

    text = scenario_text(context.run_config)
    deployed_threads(context.run_config, text)
    scenario = scenario_from_text(text)
    out_dir = context.run_config.get("out-dir") or scenario.output.dir or f"runs/{scenario.name}"
    progress = bool(context.run_config.get("progress", scenario.output.progress))
    # fedsim's own engines pass the resolved scenario text; `flwr run` (a deployment) passes a path,
    # and there the server holds none of the clients' data to score an audit with.
    run_server(grid, scenario, str(out_dir), progress=progress, ground_truth="scenario-yaml" in context.run_config,
               resume=bool(context.run_config.get("resume", False)),
               tracking=json.loads(str(context.run_config["tracking"])) if "tracking" in context.run_config else None)
