"""The inline engine: an in-process Flower Grid that calls the ClientApp directly.

No Ray, no serialisation (each client gets a copy of its message), no start-up cost; the same ServerApp and ClientApp as every
other engine. Each node keeps its own ``Context`` (so ``Context.state`` persists across
rounds exactly as on a SuperNode). A ClientApp that raises becomes an error reply, as
on a real SuperNode, and the round goes on.

The round's timeout (``engine.timeout_s``) is kept by a watchdog. A round's clients run
one after another on one long-lived worker thread (handed the whole round at once) while
the server waits up to the timeout. A thread cannot be killed, so when the time is up the
round is given up: the running call is abandoned, its node gets no reply (``rounds.py``
records ``timeout``), nor do the clients the round had no time left for, and the server
goes on with a fresh worker thread. The abandoned call runs on in its own thread and
everything it produces is dropped: it works on a copy of its node's Context (every call
gets one: ``context_copy``, 1-15 us) that is kept only from calls that returned in time.
Until it returns, its node is busy: later rounds give that node an error reply saying so
at once (no waiting), and once the call returns the node trains again. (Ray kills and
replaces a hung call's actor instead.)

An abandoned call shares no mutable state with the calls after it: they run on a fresh thread,
and fedsim's ClientApp keeps its model objects per thread (``fedsim.run.apps._model_of``), so
the late call trains its own model object on, never the next clients'. A process that ends
while an abandoned call still runs (maybe inside torch, whose threads would abort the
interpreter's shut-down: exit 134 or 139 after the results were written) leaves with
``os._exit`` and the run's own exit code, once logging and the standard streams are flushed
(``exit_past_abandoned_calls``, which `python -m fedsim` calls last).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Iterator, MutableMapping

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

NODE_ID_BASE = 1000  # node ids are NODE_ID_BASE + partition id, the same on every engine


class NodeContexts(MutableMapping):
    """Every node's Context by node id, each made when its node is first addressed.

    An untouched Context is only its ids and an empty state, so making it on first use
    changes nothing a ClientApp sees, and 100,000 nodes of which a run samples a few
    don't cost ~0.5 s and ~80 MB of Contexts up front. The node set is fixed.
    """

    def __init__(self, num_nodes: int, run_id: int, run_config: dict):
        self._ids = range(NODE_ID_BASE, NODE_ID_BASE + num_nodes)
        self._run_id, self._run_config = run_id, dict(run_config)
        self._made: dict[int, Context] = {}

    def __getitem__(self, node_id: int) -> Context:
        context = self._made.get(node_id)
        if context is None:
            if node_id not in self._ids:
                raise KeyError(node_id)
            context = self._made[node_id] = Context(
                run_id=self._run_id, node_id=node_id,
                node_config={"partition-id": node_id - NODE_ID_BASE, "num-partitions": len(self._ids)},
                state=RecordDict(), run_config=dict(self._run_config))
        return context

    def __setitem__(self, node_id: int, context: Context) -> None:
        if node_id not in self._ids:
            raise KeyError(node_id)
        self._made[node_id] = context

    def __delitem__(self, node_id: int) -> None:
        raise TypeError("simulated nodes cannot be removed")

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._ids

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def node_contexts(num_nodes: int, run_id: int, run_config: dict) -> NodeContexts:
    return NodeContexts(num_nodes, run_id, run_config)


def call_client(client_app: ClientApp, msg: Message, context: Context) -> Message:
    """Run the ClientApp; an exception becomes an error reply naming it."""
    try:
        return client_app(msg, context)
    except Exception as exc:  # noqa: BLE001 - a failing client is data, not a crash
        last = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def own_copy(msg: Message) -> Message:
    """The message with its own records, as a client receives it over a wire (or on Ray).

    Flower builds one round's messages around one shared RecordDict, so a client that edited
    its content would change what the next client reads. Every record is copied (Flower's own
    shallow ``copy()``: ~1 us); the Array objects inside, whose bytes are immutable, and the
    values of config records are shared.
    """
    out = copy.copy(msg)
    content = RecordDict()
    for key, record in msg.content.items():
        content[key] = record.copy()
    out.content = content
    return out


class SimulatedNodesGrid(Grid):
    """What fedsim's own Grids share: simulated nodes with one Context each, message ids."""

    def __init__(self, num_nodes: int, run_config: dict, run_id: int = 1):
        self._run = Run.create_empty(run_id)
        self.contexts = node_contexts(num_nodes, run_id, run_config)
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def assign_id(self, msg: Message) -> str:
        """Give an outgoing message its id (a SuperLink's job; Metadata has no setter)."""
        mid = str(next(self._ids))
        msg.metadata.__dict__["_message_id"] = mid
        return mid


def context_copy(context: Context) -> Context:
    """A Context whose state a call may change without touching ``context``: every record is
    copied (Flower's shallow ``copy()``), and so are the lists in config and metric records; the
    Arrays, whose bytes are immutable, are shared, as are the ids and configs clients only read.
    (A 4-array model and a 50-float history: 15 us, against 57 us for ``copy.deepcopy`` of the
    state; an empty state: 1.4 us.)"""
    state = RecordDict()
    for key, record in context.state.items():
        record = record.copy()
        if not isinstance(record, ArrayRecord):
            # Straight into the record's dict (what Flower's own copy() fills): setting a list through
            # the record re-checks every element's type (~1 us each), for values already checked.
            data = record.__dict__.get("_data")
            for name, value in list(record.items()):
                if isinstance(value, list):
                    if data is not None:
                        data[name] = list(value)
                    else:
                        record[name] = list(value)
        state[key] = record
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=state, run_config=context.run_config)


class _Round:
    """A round's client calls, run one after another on a worker thread while the server waits.

    One hand-off a round, not one a call: waking a thread costs ~20 us on an idle machine but
    milliseconds on a loaded one, where a woken thread queues behind other processes (W1 on a
    2-core machine at load 8, a hand-off per call: rounds 16-60% longer in 4 of 5 paired runs). ``_guard`` makes giving up
    and finishing a call exclusive, so each call either lands in ``results`` before the server
    gives up or never does."""

    def __init__(self, client_app: ClientApp, jobs: list[tuple[str, Message, Context]]):
        self.client_app, self.jobs = client_app, jobs
        self.results: dict[str, tuple[Message, Context]] = {}
        self.error: BaseException | None = None
        self.current: Message | None = None  # the message whose call is running
        self.cancelled = False
        self._guard = threading.Lock()
        self._running = threading.Lock()
        self._running.acquire()  # held until every call returned (or the round was given up)

    def run(self) -> None:
        try:
            for mid, msg, context in self.jobs:
                with self._guard:
                    if self.cancelled:
                        return
                    self.current = msg
                reply = call_client(self.client_app, msg, context)
                with self._guard:
                    if self.cancelled:  # too late: the server has moved on without it
                        return
                    self.results[mid] = (reply, context)
                    self.current = None
        except BaseException as exc:  # noqa: BLE001 - re-raised in the server's thread (call_client catches Exception)
            self.error = exc
        finally:
            self._running.release()

    def wait(self, timeout: float) -> bool:
        """Whether every call returned within ``timeout`` seconds."""
        if self._running.acquire(timeout=timeout):
            self._running.release()  # so that ``done`` and later waits see it finished
            return True
        return False

    def give_up(self) -> Message | None:
        """Stop the round here: calls not started never run, a late one is dropped. Returns the
        message whose call is still running (its node stays busy until ``done``), if any."""
        with self._guard:
            self.cancelled = True
            return self.current

    def done(self) -> bool:
        return not self._running.locked()


class _ClientThread:
    """A daemon thread that runs the rounds it is given, one after another (one thread for a
    whole run, unless a call hangs: a thread per round would cost its start-up every round)."""

    def __init__(self):
        self._rounds: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(self._rounds,), name="fedsim-inline-client", daemon=True).start()

    @staticmethod
    def _serve(rounds: queue.SimpleQueue) -> None:
        while (work := rounds.get()) is not None:
            work.run()

    def submit(self, work: _Round) -> None:
        self._rounds.put(work)

    def retire(self) -> None:
        """Exit once the current round (if any) returns."""
        self._rounds.put(None)


_abandoned: list[_Round] = []  # the rounds given up on while a call of theirs ran (maybe still running)


def _abandon(work: _Round) -> None:
    """Remember a round whose running call was given up, so the process's exit can get past it."""
    _abandoned[:] = [w for w in _abandoned if not w.done()]
    _abandoned.append(work)


def exit_past_abandoned_calls(code: int) -> None:
    """End the process now with ``code`` if an abandoned call still runs; else return (`python -m fedsim`
    calls this right before it exits). The interpreter's shut-down would end that daemon thread wherever
    it next takes the GIL, which inside torch's C++ frames aborts the process ("terminate called without
    an active exception", exit 134) or crashes it (139). Nothing of the run is lost: its results were
    written and closed; logging and the standard streams are flushed first."""
    if all(work.done() for work in _abandoned):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing more to save
            pass
    os._exit(code)


def _which_call(msg: Message) -> str:
    """'round R' for a training message (its config says the round), else its message type."""
    for record in msg.content.config_records.values():
        if "server-round" in record:
            return f"round {record['server-round']}"
    return f"a {msg.metadata.message_type} message"


class InlineGrid(SimulatedNodesGrid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1):
        super().__init__(num_nodes, run_config, run_id)
        self.client_app = client_app
        self._thread: _ClientThread | None = None
        self._retire = None  # weakref.finalize: the worker thread ends with the Grid
        self._deadline: float | None = None  # send_and_receive's, while it pushes
        self._hung: dict[int, tuple[_Round, str]] = {}  # node -> the round it hangs in, and which call it was

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the clients now: under ``send_and_receive``'s deadline (the watchdog), or, pushed
        alone (no deadline), each in the caller's thread."""
        return self._deliver(messages, self._deadline)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Through push_messages, as Flower's own Grids do (a wrapper or a test hooking it sees every message).
        self._deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ids = self.push_messages(messages)
        finally:
            self._deadline = None
        return self.pull_messages(ids)

    def _deliver(self, messages: Iterable[Message], deadline: float | None) -> list[str]:
        for node in [n for n, (work, _) in self._hung.items() if work.done()]:
            del self._hung[node]  # its late call returned; what it produced is dropped
        ids, jobs = [], []
        for msg in messages:
            mid = self.assign_id(msg)
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self._hung:
                self._replies[mid] = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=(
                    f"timeout: node busy: its call of {self._hung[node][1]} exceeded engine.timeout_s "
                    "and has not returned yet (inline cannot stop a running client)")), reply_to=msg)
            elif deadline is None:
                self._replies[mid] = call_client(self.client_app, own_copy(msg), self.contexts[node])
            else:
                jobs.append((mid, own_copy(msg), context_copy(self.contexts[node])))
        if jobs:
            self._watch(_Round(self.client_app, jobs), deadline)
        return ids

    def _watch(self, work: _Round, deadline: float) -> None:
        """Run a round's calls on the worker thread, waiting for them until ``deadline``."""
        if self._thread is None:
            self._thread = _ClientThread()
            self._retire = weakref.finalize(self, self._thread.retire)
        self._thread.submit(work)
        try:
            finished = work.wait(max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C or SIGTERM while waiting: the clients not yet run must not run on behind it
            if work.give_up() is not None:
                _abandon(work)  # its running call goes on in the worker thread: the exit must get past it
            raise
        if not finished:  # a call hung, or the round ran out of time
            running = work.give_up()
            if running is not None:
                self._hung[running.metadata.dst_node_id] = (work, _which_call(running))
                _abandon(work)
            self._retire()  # that thread exits once the running call returns; the next round gets a new one
            self._thread = self._retire = None
        elif work.error is not None:
            raise work.error
        for mid, (reply, context) in work.results.items():  # only calls that returned in time
            self.contexts[context.node_id] = context
            self._replies[mid] = reply
