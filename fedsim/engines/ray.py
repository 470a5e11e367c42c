"""The ray engine: a Flower Grid that runs the ClientApp in a pool of Ray actors.

Why not Flower's Simulation Engine (``run_simulation``): it costs seconds to start and
~0.3-0.5 s per round of 10 small clients here (benchmarks/engine_overhead.py, W1), and its
actors load the ClientApp again for every call. This Grid sends the very Messages a
SuperLink would to long-lived actors, each hosting the unchanged ClientApp.

- One actor per ``num_cpus_per_client`` CPUs (or ``num_actors``), never more than clients.
  Each free actor takes its share of the waiting messages in one call: a Ray call's round
  trip (about 1 ms idle, 4-5 ms measured on a busy 2-core machine) costs as much as
  training a small client, so a call per message would cost more than it parallelises.
- Per-node ``Context``: the Grid owns every node's Context (as ``InlineGrid`` does), ships
  it with each call and keeps the one the actor returns. Any actor can serve any node,
  state survives rounds and actor crashes, and one seed gives the inline engine's metrics.
  A node never has two calls in flight, so its state can't fork.
- Data: the driver builds the scenario's world (data set and client splits) once, while
  Ray starts, and puts it in Ray's object store; every actor adopts it, so no worker
  process loads or partitions data (or pays for importing the libraries that do).
- A ClientApp exception becomes an error reply inside the actor (``call_client``); an
  actor that dies (segfault, ``os._exit``, OOM kill) is replaced by a fresh one and its
  batch is sent again one message per call, so the message that kills an actor gets an
  error reply and no other node loses its round. (Not Ray's own actor restart: a call
  sent before Ray notices the death would fail too.)

Message and Context pickle as they are (Flower's own Ray backend ships them the same
way); a reply is built from its instruction (``Message(..., reply_to=msg)``), which needs
no ``TaskIdentity`` in the actor.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from ..scenario import RayConfig, ScenarioError
from .inline import SimulatedNodesGrid, call_client

# Dead actors are replaced at most this many times per pool slot; past that (an actor that
# cannot even start, say) their messages just fail.
REPLACEMENTS_PER_ACTOR = 4


class ClientAppActor:
    """Hosts one ClientApp in one worker process; turned into a Ray actor by ``RayGrid``."""

    def __init__(self, client_app: ClientApp, torch_threads: int, setup: Callable[[], None] | None):
        import torch

        torch.set_num_threads(torch_threads)
        logging.getLogger("flwr").setLevel(logging.ERROR)  # failures come back as error replies
        if setup is not None:
            setup()
        self.client_app = client_app

    def adopt(self, scenario_yaml: str, world) -> None:
        """Take the driver's world (from the object store) instead of building one here."""
        from ..world import adopt_world

        adopt_world(scenario_yaml, world)

    def run(self, calls: list[tuple[Message, Context]]) -> list[tuple[Message, Context]]:
        return [(call_client(self.client_app, msg, context), context) for msg, context in calls]


class _Runner:
    """A Ray actor that runs the functions it is given, one after another."""

    def __init__(self, torch_threads: int):
        import torch

        torch.set_num_threads(torch_threads)

    def run(self, fn, *args):
        return fn(*args)


class RayActorExecutor:
    """The part of ``concurrent.futures.Executor`` the audit uses, on one long-lived Ray actor
    (one process that imports torch and the attacks once; a task per job could start a fresh
    worker process each time)."""

    def __init__(self, num_cpus: float, torch_threads: int = 1):
        import ray

        self._actor = ray.remote(_Runner).options(num_cpus=num_cpus).remote(torch_threads)

    def submit(self, fn, *args):
        return self._actor.run.remote(fn, *args).future()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """The caller has waited on the futures; the actor goes."""
        import ray

        ray.kill(self._actor, no_restart=True)


def _audits(scenario_yaml: str | None) -> bool:
    """Whether the scenario (its resolved YAML) runs the privacy audit."""
    if scenario_yaml is None:
        return False
    import yaml

    return (yaml.safe_load(scenario_yaml) or {}).get("audit", "none") not in ("none", None)


def bind_ray_to_loopback() -> None:
    """Make a Ray instance started by this process listen on 127.0.0.1 only.

    Ray binds its gRPC servers to 0.0.0.0 unless the node address is loopback, and it
    turns ``_node_ip_address="127.0.0.1"`` into the routable address unless multi-node
    clusters are disabled, which Ray's own switch for macOS/Windows
    (``ray_constants.ENABLE_RAY_CLUSTER``) does. Ray-internal, hence here; if an upgrade
    moves it, the AttributeError says so. A single machine never needs more.
    """
    import ray._private.ray_constants as ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise AttributeError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone; see fedsim/engines/ray.py")
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a single-machine Ray instance with as little start-up as Ray allows.

    No dashboard, workers' output kept out of the driver's terminal (failures come back
    as error replies), no usage reporting, loopback only.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bind_ray_to_loopback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # accelerator env-var notice
        # address="local": a new instance of our own, whatever RAY_ADDRESS or a `ray start`
        # cluster file says (joining a cluster is only ever asked for by engine.ray.address).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, ignore_reinit_error=True)


def stop_local_ray() -> None:
    """``ray.shutdown()`` for a Ray instance this process started, without its one-second stall.

    Ray stops its processes one by one, each with SIGTERM and up to a second's grace. Its
    autoscaler monitor (useless on a fixed single-machine cluster) does not exit on SIGTERM,
    so every shutdown waited out that second (measured: 1.37 s against 0.2-0.3 s without
    the monitor). Killed first here; the rest is Ray's own shutdown. Ray-internal names, so
    if they move this falls back to the plain (slower) shutdown.
    """
    import ray
    import ray._private.ray_constants as ray_constants
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    ray.shutdown()


class RayGrid(SimulatedNodesGrid):
    """A Grid whose nodes are served by a pool of Ray actors. Use as a context manager."""

    def __init__(self, num_nodes: int, run_config: dict, config: RayConfig | None = None, run_id: int = 1, *,
                 torch_threads: int = 1, client_app: ClientApp | None = None,
                 setup: Callable[[], None] | None = None):
        """``setup`` runs once in every actor before it serves (e.g. to register plug-in strategies)."""
        if client_app is None:
            from ..apps import client_app as fedsim_client_app

            client_app = fedsim_client_app
        self.config = config or RayConfig()
        self.client_app, self.torch_threads, self.setup = client_app, torch_threads, setup
        super().__init__(num_nodes, run_config, run_id)
        self._started_ray = False
        self.actors: list = []
        self._free: deque = deque()
        self._pending: deque[tuple[str, Message]] = deque()
        self._in_flight: dict = {}  # ObjectRef -> (actor, [(message id, message), ...])
        self._alone: set[str] = set()  # ids of messages that were in a batch whose actor died
        self._busy_nodes: set[int] = set()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RayGrid":
        import ray

        cfg = self.config
        wanted = cfg.num_actors or 0
        world_job = None
        scenario_yaml = self.contexts[next(iter(self.contexts))].run_config.get("scenario-yaml")
        if scenario_yaml is not None:  # build (and check) the data while Ray starts
            from concurrent.futures import ThreadPoolExecutor

            from ..world import checked_world

            pool = ThreadPoolExecutor(max_workers=1)
            world_job = pool.submit(checked_world, scenario_yaml)
            pool.shutdown(wait=False)
        if cfg.address is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(address=cfg.address, log_to_driver=False, logging_level=logging.WARNING,
                         ignore_reinit_error=True)
        elif not ray.is_initialized():
            # An explicit num_actors is honoured even beyond the cores (oversubscribed).
            needed = math.ceil(wanted * cfg.num_cpus_per_client)
            start_local_ray(max(os.cpu_count() or 1, needed))
            self._started_ray = True
        cpus = float(ray.cluster_resources().get("CPU", 1))
        fits = max(1, int(cpus // cfg.num_cpus_per_client))
        if wanted > fits:
            self.__exit__(None, None, None)
            raise ScenarioError(f"engine.ray.num_actors: {wanted} actors need {wanted * cfg.num_cpus_per_client:g} "
                                f"CPUs; the Ray cluster has {cpus:g}")
        if not wanted and fits >= 2 and _audits(scenario_yaml):
            # The audit's attacks get a CPU of their own (its actor takes num_cpus 1 when one is
            # spare): overlapping them with training beats oversubscribing every core
            # (benchmarks/audit.py, 2 cores: 17.7 s with 1 client actor, 26.5 s with 2).
            fits -= 1
        size = max(1, min(wanted or fits, len(self.contexts)))
        self._actor_cls = ray.remote(ClientAppActor).options(num_cpus=cfg.num_cpus_per_client)
        self._world_args: tuple = ()
        # Created asynchronously: the actors import torch and Flower while the server sets up.
        self.actors = [self._new_actor() for _ in range(size)]
        if world_job is not None:  # actors import torch and Flower meanwhile; a call runs after adopt
            try:
                self._world_args = (scenario_yaml, ray.put(world_job.result()))
            except BaseException:
                self.__exit__(None, None, None)
                raise
            for actor in self.actors:
                actor.adopt.remote(*self._world_args)
        self._free = deque(self.actors)
        self._replacements_left = REPLACEMENTS_PER_ACTOR * size
        return self

    def _new_actor(self):
        actor = self._actor_cls.remote(self.client_app, self.torch_threads, self.setup)
        if self._world_args:
            actor.adopt.remote(*self._world_args)
        return actor

    def _replace(self, dead):
        import ray

        if self._replacements_left <= 0:
            return dead
        self._replacements_left -= 1
        ray.kill(dead, no_restart=True)
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._in_flight = [], {}
        if self._started_ray:
            stop_local_ray()
            self._started_ray = False

    def audit_executor(self) -> RayActorExecutor:
        """Where the privacy audit's attacks run: a Ray actor beside the clients' actors, on a CPU of
        its own when the cluster has one to spare (then the audit overlaps training), else sharing."""
        import ray

        spare = float(ray.cluster_resources().get("CPU", 0)) - len(self.actors) * self.config.num_cpus_per_client
        return RayActorExecutor(num_cpus=1 if spare >= 1 else 0)

    # ------------------------------------------------------------------ Grid
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = self.assign_id(msg)
            self._pending.append((mid, msg))
            ids.append(mid)
        self._dispatch()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._collect(timeout=0)
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._in_flight and not all(mid in self._replies for mid in ids):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._collect(timeout=left)
        return self.pull_messages(ids)

    # ------------------------------------------------------------------ the pool
    def _dispatch(self) -> None:
        """Give every free actor its share of the pending messages whose nodes are not busy."""
        while self._free and self._pending:
            share = -(-len(self._pending) // len(self._free))  # ceil: spread evenly over free actors
            batch, skipped = [], deque()
            while self._pending and len(batch) < share:
                mid, msg = self._pending.popleft()
                node = msg.metadata.dst_node_id
                if node in self._busy_nodes or (batch and mid in self._alone):
                    skipped.append((mid, msg))
                    continue
                batch.append((mid, msg))
                self._busy_nodes.add(node)
                if mid in self._alone:
                    break
            self._pending.extendleft(reversed(skipped))
            if not batch:
                return
            actor = self._free.popleft()
            ref = actor.run.remote([(msg, self.contexts[msg.metadata.dst_node_id]) for _, msg in batch])
            self._in_flight[ref] = (actor, batch)

    def _collect(self, timeout: float | None) -> None:
        """Harvest finished calls (waiting up to ``timeout`` for the first), then dispatch more."""
        import ray

        if not self._in_flight:
            self._dispatch()
            return
        done, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
        if done:  # take everything else that is already finished too
            done, _ = ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=0)
        for ref in done:
            actor, batch = self._in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor process died during this call
                self._free.append(self._replace(actor))
                for _, msg in batch:
                    self._busy_nodes.discard(msg.metadata.dst_node_id)
                if len(batch) > 1:  # which one killed it is unknown: run each alone
                    self._alone.update(mid for mid, _ in batch)
                    self._pending.extendleft(reversed(batch))
                    continue
                (mid, msg), = batch
                reason = f"ClientApp actor died: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                results = [(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=msg), None)]
            else:
                self._free.append(actor)
            for (mid, msg), (reply, context) in zip(batch, results):
                node = msg.metadata.dst_node_id
                if context is not None:
                    self.contexts[node] = context
                self._replies[mid] = reply
                self._busy_nodes.discard(node)
                self._alone.discard(mid)
        self._dispatch()
