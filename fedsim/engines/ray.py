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
  actor that dies (segfault, ``os._exit``, OOM kill) is always replaced by a fresh one and
  every message it held fails with a reason naming the death (issue 21 (4): no lost call goes
  unrecorded, none is silently sent again); which one killed it is unknown, so each of those
  nodes runs alone until it answers again, and a node that kills its actor every round takes
  no batchmates down after its first. An actor that dies in its own start-up
  (``setup`` raising, say) fails its batch with that reason at once: every round it is
  tried again, and a run whose every client fails stops after three rounds
  (``FailureWatch``). (Not Ray's own actor restart: a call sent before Ray notices the
  death would fail too.)
- The round's timeout (``engine.timeout_s``, ``send_and_receive(timeout=)``): when it
  passes, each call still running is given up: the replies its actor finished so far are
  kept (the actor answers ``finished`` on a second thread) if they were ready before the deadline
  (each reply is stamped on the actor's clock; ``RayGrid._late``: a reply that may have come
  after it is a timeout, never a success), the actor is killed and
  replaced, its nodes are free again and its unfinished messages, like those never
  dispatched, get no reply (``rounds.py`` records ``timeout``). A hung client, an actor
  that never got scheduled or a timeout too short for the work all end that way; the next
  round starts with every node and an idle pool, and nothing from a given-up call (its
  reply, its Context) ever reaches the Grid. Starting actors (round 1's pool, replacements)
  don't eat the clients' time: the round's clock starts once they are up, or after
  ``ACTOR_START_S`` (30 s) if one never comes up. A node whose call killed its actor runs
  alone until it answers again, so it takes no batchmates down with it.
- Where: ``engine.ray.address`` unset starts a private, loopback-only instance
  (``fedsim.engines.ray_cluster.start_local_ray``) and never joins a cluster, whatever ``RAY_ADDRESS`` says;
  ``HOST:PORT`` joins the cluster whose head (GCS) listens there, ``auto`` the one
  ``RAY_ADDRESS`` names or ``ray start`` started on this machine. Before joining, the
  address is asked for its cluster id with a 3-second deadline (``check_ray_address``):
  an address that is malformed (scenario validation), refuses, stays silent or is no Ray
  head is one line and exit 2 within seconds, where ``ray.init`` would retry for minutes.
  A process already connected to Ray (a sweep's run) keeps that connection.
- A client actor that no node could host (``num_cpus_per_client`` above every node's
  CPUs) is refused before round 1, exit 2; it would wait unscheduled forever.

Message and Context pickle as they are (Flower's own Ray backend ships them the same
way); a reply is built from its instruction (``Message(..., reply_to=msg)``), which needs
no ``TaskIdentity`` in the actor.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from ..scenario.schema import RayConfig, ScenarioError
from .inline import SimulatedNodesGrid, call_client
from .ray_cluster import check_ray_address, join_ray, start_local_ray, stop_local_ray

# How long a given-up call's actor may take to say what it finished before it is killed (a client
# holding the GIL in one long C call cannot answer; then nothing of its batch is kept).
FINISHED_WAIT_S = 1.0
# How long a round waits for actors still starting before its clock starts anyway (at least; or
# engine.timeout_s if longer): a worker process importing torch and Flower took 4-8 s on a loaded
# 2-core machine, and one that cannot be scheduled (a cluster busy with other jobs) never starts.
ACTOR_START_S = 30.0


class ClientAppActor:
    """Hosts one ClientApp in one worker process; turned into a Ray actor by ``RayGrid``."""

    def __init__(self, client_app: ClientApp, torch_threads: int, setup: Callable[[], None] | None,
                 await_world: bool = False, vectorized_chunk: int | None = None):
        if setup is not None:  # first: an actor that cannot start says so before paying for torch
            setup()
        import torch

        torch.set_num_threads(torch_threads)
        logging.getLogger("flwr").setLevel(logging.ERROR)  # failures come back as error replies
        self.client_app = client_app
        # The actor runs two threads (max_concurrency=2) so that ``finished`` can answer while
        # ``run`` is busy; Ray then no longer promises to run ``adopt`` before ``run``, so a run
        # waits for the world when one was announced.
        self._world = threading.Event()
        if not await_world:
            self._world.set()
        self._world_error: BaseException | None = None
        self._finished: list[tuple[Message, Context, float] | None] = []
        self._chunk = vectorized_chunk  # engine.ray.vectorized: train messages trained together in chunks

    def adopt(self, scenario_yaml: str, world) -> None:
        """Take the driver's world (from the object store) instead of building one here."""
        from ..world.build import adopt_world

        try:
            adopt_world(scenario_yaml, world)
        except BaseException as exc:  # noqa: BLE001 - the waiting run raises it (an error reply per message)
            self._world_error = exc
        finally:
            self._world.set()

    def run(self, calls: list[tuple[Message, Context]]) -> tuple[list[tuple[Message, Context, float]], float]:
        """Each message's (reply, Context, when it finished), in the order of ``calls``, and the time it
        returns: on this process's monotonic clock, so the driver can tell which replies were ready before
        its deadline. With ``engine.ray.vectorized`` the training messages are trained together first
        (``fedsim.engines.vectorized.train_in_chunks``), then the others one by one."""
        self._world.wait()
        # a fresh list per call (``finished`` never mixes two calls); None: not finished yet
        self._finished = done = [None] * len(calls)
        if self._world_error is not None:
            error = Error(code=ErrorCode.CLIENT_APP_CRASHED,
                          reason=f"ClientApp actor has no data: {type(self._world_error).__name__}: "
                                 f"{self._world_error}")
            for i, (msg, _) in enumerate(calls):
                done[i] = (Message(error, reply_to=msg), None, time.monotonic())
            return done, time.monotonic()
        if self._chunk is not None:
            from .vectorized import VectorizedClient, train_in_chunks

            train = [VectorizedClient(str(i), msg, context) for i, (msg, context) in enumerate(calls)
                     if msg.metadata.message_type == MessageType.TRAIN]
            for part in train_in_chunks(train, self._chunk):
                finished_at = time.monotonic()
                for c in part:
                    done[int(c.mid)] = (c.reply, c.context, finished_at)
        for i, (msg, context) in enumerate(calls):
            if done[i] is None:
                done[i] = (call_client(self.client_app, msg, context), context, time.monotonic())
        return done, time.monotonic()

    def finished(self) -> tuple[list[tuple[Message, Context, float] | None], float]:
        """What the running (or last) call has finished so far (None for a message not finished yet), for
        a batch the driver gives up on (stamped as ``run``'s are), and the time now."""
        return list(self._finished), time.monotonic()


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

    def __init__(self, num_cpus: float, torch_threads: int = 1, num_gpus: float = 0.0):
        import ray

        self._actor = ray.remote(_Runner).options(num_cpus=num_cpus, num_gpus=num_gpus).remote(torch_threads)

    def submit(self, fn, *args):
        return self._actor.run.remote(fn, *args).future()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """The caller has waited on the futures; the actor goes."""
        import ray

        ray.kill(self._actor, no_restart=True)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (Ray's carry tracebacks and actor details)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _audits(scenario_yaml: str | None) -> bool:
    """Whether the scenario (its resolved YAML) runs the privacy audit."""
    if scenario_yaml is None:
        return False
    import yaml

    return (yaml.safe_load(scenario_yaml) or {}).get("audit", "none") not in ("none", None)


def _audit_gpus(scenario_yaml: str | None) -> float:
    """The audit actor's GPU share: ``engine.ray.num_gpus_audit`` (default a client actor's share) when the
    audit computes on a GPU (``audit.device``, else ``engine.device``, not cpu), else none."""
    if not _audits(scenario_yaml):
        return 0.0
    from ..scenario.schema import scenario_from_text

    s = scenario_from_text(scenario_yaml)
    if s.audit_device() in ("cpu", "mps"):  # Ray shares out CUDA GPUs only
        return 0.0
    ray_cfg = s.engine.ray
    return ray_cfg.num_gpus_audit if ray_cfg.num_gpus_audit is not None else ray_cfg.num_gpus_per_client


class RayGrid(SimulatedNodesGrid):
    """A Grid whose nodes are served by a pool of Ray actors. Use as a context manager."""

    def __init__(self, num_nodes: int, run_config: dict, config: RayConfig | None = None, run_id: int = 1, *,
                 torch_threads: int = 1, client_app: ClientApp | None = None,
                 setup: Callable[[], None] | None = None, vectorized_chunk: int | None = None):
        """``setup`` runs once in every actor before it serves (e.g. to register plug-in strategies);
        ``vectorized_chunk``: each actor trains its share of a round together, in chunks of this many
        clients (``engine.ray.vectorized``)."""
        if client_app is None:
            from ..run.apps import client_app as fedsim_client_app

            client_app = fedsim_client_app
        self.config = config or RayConfig()
        self.client_app, self.torch_threads, self.setup = client_app, torch_threads, setup
        self.vectorized_chunk = vectorized_chunk
        super().__init__(num_nodes, run_config, run_id)
        self._started_ray = self._joined_ray = False
        self._audit_gpus = 0.0  # the audit actor's GPU share (``_start_pool``)
        self.actors: list = []
        self._free: deque = deque()
        self._pending: deque[tuple[str, Message]] = deque()
        self._in_flight: dict = {}  # ObjectRef -> (actor, [(message id, message), ...])
        self._lethal: set[int] = set()  # nodes whose last call died with its actor: they run alone
        self._deadline: float | None = None  # send_and_receive's, for the messages _deadline_ids
        self._deadline_ids: set[str] = set()
        self._busy_nodes: set[int] = set()
        self._starting: dict = {}  # ObjectRef of __ray_ready__ -> an actor that is still starting

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RayGrid":
        import ray

        cfg = self.config
        wanted = cfg.num_actors or 0
        world_job = None
        scenario_yaml = self.contexts[next(iter(self.contexts))].run_config.get("scenario-yaml")
        if scenario_yaml is not None:  # build (and check) the data while Ray starts
            from concurrent.futures import ThreadPoolExecutor

            from ..world.build import checked_world

            pool = ThreadPoolExecutor(max_workers=1)
            world_job = pool.submit(checked_world, scenario_yaml)
            pool.shutdown(wait=False)
        if cfg.address is not None:
            if ray.is_initialized():  # e.g. a sweep's run, already inside the cluster: stay there
                check_ray_address(cfg.address)
            else:
                join_ray(cfg.address)
                self._joined_ray = True
        elif not ray.is_initialized():
            # An explicit num_actors is honoured even beyond the cores (oversubscribed).
            needed = math.ceil(wanted * cfg.num_cpus_per_client)
            start_local_ray(max(os.cpu_count() or 1, needed))
            self._started_ray = True
        try:
            return self._start_pool(wanted, world_job, scenario_yaml)
        except BaseException:  # a refusal, or Ctrl-C / SIGTERM before round 1: stop what was started
            self.__exit__(None, None, None)
            raise

    def _start_pool(self, wanted: int, world_job, scenario_yaml: str | None) -> "RayGrid":
        """``__enter__``, once Ray runs: check the actors fit, start them, hand them the world."""
        import ray

        cfg = self.config
        cpus = float(ray.cluster_resources().get("CPU", 0))
        # An actor runs on one node: what counts is each node's CPUs, not the cluster's sum.
        node_cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus]
        fits = sum(int(c // cfg.num_cpus_per_client + 1e-9) for c in node_cpus)
        if fits == 0:
            raise ScenarioError(f"engine.ray.num_cpus_per_client: {cfg.num_cpus_per_client:g} CPUs per client actor, "
                                f"but the largest Ray node has {max(node_cpus):g}: no client could ever run")
        if wanted > fits:
            raise ScenarioError(f"engine.ray.num_actors: {wanted} actors need {wanted * cfg.num_cpus_per_client:g} "
                                f"CPUs; the Ray cluster has {cpus:g}")
        self._audit_gpus = _audit_gpus(scenario_yaml)
        if cfg.num_gpus_per_client > 0 or self._audit_gpus > 0:
            fits = min(fits, self._gpu_fits(wanted))
        if not wanted and fits >= 2 and _audits(scenario_yaml):
            # The audit's attacks get a CPU of their own (its actor takes num_cpus 1 when one is
            # spare): overlapping them with training beats oversubscribing every core
            # (benchmarks/audit.py, 2 cores: 17.7 s with 1 client actor, 26.5 s with 2).
            fits -= 1
        size = max(1, min(wanted or fits, len(self.contexts)))
        # Two threads: ``run`` and, when the driver gives a call up, ``finished`` (see the class).
        self._actor_cls = ray.remote(ClientAppActor).options(num_cpus=cfg.num_cpus_per_client,
                                                             num_gpus=cfg.num_gpus_per_client, max_concurrency=2)
        self._await_world = world_job is not None
        self._world_args: tuple = ()
        # Created asynchronously: the actors import torch and Flower while the server sets up.
        self.actors = [self._new_actor() for _ in range(size)]
        if world_job is not None:  # actors import torch and Flower meanwhile; a call runs after adopt
            self._world_args = (scenario_yaml, ray.put(world_job.result()))
            for actor in self.actors:
                self._adopt(actor)
        self._free = deque(self.actors)
        return self

    def _gpu_fits(self, wanted: int) -> int:
        """How many client actors the Ray nodes' GPUs hold at ``num_gpus_per_client`` each, once the audit
        actor's share is set aside on the node with the most GPUs (it would otherwise wait for ever)."""
        import ray

        share = self.config.num_gpus_per_client
        node_gpus = sorted((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")),
                           reverse=True) or [0.0]
        if self._audit_gpus > 0:
            if node_gpus[0] < self._audit_gpus:
                raise ScenarioError(f"engine.ray.num_gpus_audit: the audit actor needs {self._audit_gpus:g} GPUs, but "
                                    f"the largest Ray node has {node_gpus[0]:g}")
            node_gpus[0] -= self._audit_gpus
        if share == 0:
            return len(self.contexts)
        fits = sum(int(g // share + 1e-9) for g in node_gpus)
        if fits == 0:
            raise ScenarioError(f"engine.ray.num_gpus_per_client: {share:g} GPUs per client actor, but the Ray nodes "
                                f"have {', '.join(f'{g:g}' for g in node_gpus)} GPUs free: no client could ever run")
        if wanted > fits:
            raise ScenarioError(f"engine.ray.num_actors: {wanted} actors need {wanted * share:g} GPUs; the Ray nodes "
                                f"have {sum(node_gpus):g} free")
        return fits

    def _new_actor(self):
        actor = self._actor_cls.remote(self.client_app, self.torch_threads, self.setup, self._await_world,
                                       self.vectorized_chunk)
        self._starting[actor.__ray_ready__.remote()] = actor
        if self._world_args:
            self._adopt(actor)
        return actor

    def _adopt(self, actor) -> None:
        """Hand ``actor`` the world; it is up (see ``_starting``) once it has taken it."""
        done = actor.adopt.remote(*self._world_args)
        self._starting = {ref: a for ref, a in self._starting.items() if a is not actor}
        self._starting[done] = actor

    def _replace(self, dead):
        """A fresh actor in ``dead``'s place, always: a pool never keeps a dead actor (an actor that
        cannot start fails its messages with the reason; FailureWatch stops a run that never trains)."""
        import ray

        ray.kill(dead, no_restart=True)
        self._starting = {ref: actor for ref, actor in self._starting.items() if actor is not dead}
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._in_flight, self._starting = [], {}, {}
        if self._started_ray:
            stop_local_ray()
            self._started_ray = False
        elif self._joined_ray:  # only this driver's connection; the cluster runs on
            ray.shutdown()
            self._joined_ray = False

    def audit_executor(self) -> RayActorExecutor:
        """Where the privacy audit's attacks run: a Ray actor beside the clients' actors, on a CPU of
        its own when the cluster has one to spare (then the audit overlaps training), else sharing."""
        import ray

        spare = float(ray.cluster_resources().get("CPU", 0)) - len(self.actors) * self.config.num_cpus_per_client
        return RayActorExecutor(num_cpus=1 if spare >= 1 else 0, num_gpus=self._audit_gpus)

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
        if timeout is not None and self._starting:
            # Actors still starting (round 1's pool, replacements) do not eat the clients' time: the
            # round's clock starts once they are up (calls already run on those that are), or after
            # ACTOR_START_S if one never comes up (it cannot be scheduled: its calls then time out).
            import ray

            ready, _ = ray.wait(list(self._starting), num_returns=len(self._starting),
                                timeout=max(timeout, ACTOR_START_S))
            for ref in ready:
                del self._starting[ref]
        deadline = None if timeout is None else time.monotonic() + timeout
        self._deadline, self._deadline_ids = deadline, set(ids)
        try:
            while self._in_flight and not all(mid in self._replies for mid in ids):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._collect(timeout=left)
            missing = {mid for mid in ids if mid not in self._replies}
            if missing:  # the deadline passed (or nothing can run them): give them up
                self._collect(timeout=0)
                self._give_up({mid for mid in missing if mid not in self._replies})
        finally:
            self._deadline, self._deadline_ids = None, set()
        return self.pull_messages(ids)

    def _late(self, mid: str, finished_at: float | None, actor_now: float, seen_at: float) -> bool:
        """Whether a reply the actor finished at ``finished_at`` (its clock, which read ``actor_now`` when
        it sent the list) may have been ready only after the deadline, the list being seen here at
        ``seen_at``. ``actor_now`` came before ``seen_at``, so a reply finished more than
        ``seen_at - deadline`` before ``actor_now`` was surely in time; any other is late: no reply
        (``rounds.py`` records ``timeout``), its Context dropped. (Never trusts the two processes'
        clocks to agree: only differences on each are compared.) ``None``: a reply made here, in time."""
        deadline = self._deadline
        if deadline is None or finished_at is None or mid not in self._deadline_ids or seen_at <= deadline:
            return False
        return finished_at > actor_now - (seen_at - deadline)

    # ------------------------------------------------------------------ the pool
    def _give_up(self, ids: set[str]) -> None:
        """Abandon the messages ``ids``: those waiting are dropped; each call serving one is asked
        for what it finished (kept), then its actor is killed and replaced and its nodes freed.
        Nothing else of an abandoned call is ever read, so a late reply can't land in a later
        round and a late Context can't overwrite a newer one. Messages of other pushes that
        shared an abandoned call are sent again."""
        import ray

        if not ids:
            return
        self._pending = deque((mid, msg) for mid, msg in self._pending if mid not in ids)
        stuck = {ref: entry for ref, entry in self._in_flight.items() if any(mid in ids for mid, _ in entry[1])}
        if not stuck:
            return
        asks = {ref: actor.finished.remote() for ref, (actor, _) in stuck.items()}
        seen: dict = {}  # ask -> when its answer was seen here (each its own: _late's bound stays tight)
        waiting, until = list(asks.values()), time.monotonic() + FINISHED_WAIT_S
        while waiting and (left := until - time.monotonic()) > 0:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            now = time.monotonic()
            seen.update((ask, now) for ask in ready)
        retry = []
        for ref, (actor, batch) in stuck.items():
            del self._in_flight[ref]
            finished, actor_now = [], 0.0
            if asks[ref] in seen:
                try:
                    finished, actor_now = ray.get(asks[ref])
                except ray.exceptions.RayError:  # died meanwhile: nothing of it is kept
                    finished = []
            if len(finished) > len(batch):  # not this call's list (cannot happen: one call at a time)
                finished = []
            for (mid, msg), entry in zip(batch, finished):
                if entry is None:
                    continue  # not finished when the call was given up
                reply, context, finished_at = entry
                if self._late(mid, finished_at, actor_now, seen[asks[ref]]):
                    continue  # ready only after the deadline: a timeout, as if it never came
                if context is not None:
                    self.contexts[msg.metadata.dst_node_id] = context
                self._replies[mid] = reply
            for mid, msg in batch:
                self._busy_nodes.discard(msg.metadata.dst_node_id)
                if mid not in self._replies and mid not in ids:
                    retry.append((mid, msg))
            self._free.append(self._replace(actor))
        self._pending.extendleft(reversed(retry))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give every free actor its share of the pending messages whose nodes are not busy."""
        while self._free and self._pending:
            share = -(-len(self._pending) // len(self._free))  # ceil: spread evenly over free actors
            batch, skipped = [], deque()
            while self._pending and len(batch) < share:
                mid, msg = self._pending.popleft()
                node = msg.metadata.dst_node_id
                alone = node in self._lethal
                if node in self._busy_nodes or (batch and alone):
                    skipped.append((mid, msg))
                    continue
                batch.append((mid, msg))
                self._busy_nodes.add(node)
                if alone:
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
        seen_at = time.monotonic()  # every call in ``done`` had returned by now
        for ref in done:
            actor, batch = self._in_flight.pop(ref)
            actor_now = 0.0
            try:
                results, actor_now = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor process died during (or before) this call
                self._free.append(self._replace(actor))
                # Every message it held is lost with it and fails naming the death (its finished
                # replies died with the process; none is sent again, so no death goes unrecorded).
                # Which one killed it is unknown: each of its nodes runs alone until it answers again,
                # so the killer takes no batchmates down next time. An actor that never started fails
                # its batch with the start-up's reason (a fresh actor would die the same way).
                if getattr(exc, "actor_init_failed", False):  # Ray's text ends with the start-up's exception line
                    reason = f"ClientApp actor could not start: {_last_line(exc)}"
                else:
                    self._lethal.update(msg.metadata.dst_node_id for _, msg in batch)
                    reason = f"ClientApp actor died: {type(exc).__name__}: {_first_line(exc)}"
                results = [(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=msg), None, None)
                           for _, msg in batch]
            except ray.exceptions.RayError as exc:  # the call itself failed (e.g. a Context that won't unpickle)
                self._free.append(actor)
                reason = f"ClientApp call failed: {type(exc).__name__}: {_first_line(exc)}"
                results = [(Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=msg), None, None)
                           for _, msg in batch]
            else:
                self._free.append(actor)
            for (mid, msg), (reply, context, finished_at) in zip(batch, results):
                node = msg.metadata.dst_node_id
                self._busy_nodes.discard(node)
                if self._late(mid, finished_at, actor_now, seen_at):
                    continue  # ready only after the deadline: a timeout, as if it never came
                if context is not None:
                    self.contexts[node] = context
                    self._lethal.discard(node)
                self._replies[mid] = reply
        self._dispatch()
