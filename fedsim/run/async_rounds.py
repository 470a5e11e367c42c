"""The asynchronous server loop: completions handled in virtual-time order, each server step a record.

An asynchronous strategy (``strategies.asynchronous.AsyncStrategy``: FedBuff, FedAsync) keeps
``concurrency`` clients training. A client is sent the global model of the moment (its
``version``: the server steps so far) and trains at once on the engine, as in a synchronous
round, but its reply is *delivered* at its virtual finish time: the dispatch time plus its round
trip on its device (``fedsim.run.clock``). The loop takes the deliveries in that order (ties: by
node id); each goes into the buffer, and when the buffer holds the strategy's ``buffer_size``
replies the codec decodes them (against the model each was sent), the strategy aggregates them
(``aggregate_updates``, each update with its staleness: server steps between its dispatch and
now) and the step is a ``RoundRecord`` for the usual observers (evaluation, results, progress,
failures, checkpoint). Free slots are filled once every delivery of the current instant is
handled, with idle clients chosen on the scenario seed's stream 12, so one seed gives one run.

With ``staleness: invert`` (``fedsim.run.stale_inversion``) every update more than ``invert_threshold``
steps old is converted before the strategy sees it: an attack on it estimates the client's data, and the
client's local training replayed on that estimate from the current model is aggregated in its place,
as a fresh update. The conversions are server time: the step's virtual time grows by ``invert_time``'s
count of them, and deliveries that arrive meanwhile wait for the server. The step's row says how many
updates were inverted (``inverted``) and their mean cost (``invert_wall_s``, wall seconds).

A failed call (an error reply) is delivered at its dispatch time and counts in the next step's
``failures``; if every slot's worth of deliveries fails before the buffer fills, the step is a
record without replies (the failure watch stops a run that does nothing else).

``AsyncState`` holds what is between steps (the calls in flight with their replies, the buffer,
the time, the version): an observer with state, so checkpoint and resume keep it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from strategies.asynchronous import AsyncStrategy, AsyncUpdate
from strategies.compression import Codec

from .clock import VirtualClock
from .metered import MeteredGrid
from .rounds import ModelDiverged, NodeRound, RoundObserver, RoundRecord, _decode_replies, _node_round, nonfinite
from .stale_inversion import Inverted, StaleInversion

ASYNC_STREAM = 12  # the choice of idle clients to send work to (fedsim.world.build lists the streams)


@dataclass
class Call:
    """One client call: sent at ``dispatched_s`` with the model of ``version``, delivered at ``finish_s``."""

    node_id: int
    version: int
    dispatched_s: float
    finish_s: float
    sent: RecordDict
    wire: RecordDict | None      # the reply as it travelled (None: failed)
    error: str | None
    partition_id: int | None
    virtual_s: float             # its round trip (0 for a failure)

    def node_round(self) -> NodeRound:
        return NodeRound(self.node_id, self.sent, self.wire, self.error, self.partition_id, self.wire, self.virtual_s)


@dataclass
class AsyncState(RoundObserver):
    state_key = "async"
    now: float = 0.0                 # virtual seconds since the start
    version: int = 0                 # server steps taken
    dispatches: int = 0              # dispatch events so far (keys the seeded choice of clients)
    last_step_s: float = 0.0         # virtual time of the last server step
    in_flight: list[Call] = field(default_factory=list)
    buffer: list[Call] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("now", "version", "dispatches", "last_step_s", "in_flight", "buffer")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _dispatch(state: AsyncState, strategy: AsyncStrategy, grid: MeteredGrid, arrays: ArrayRecord,
              clock: VirtualClock, timeout: float, train_config: ConfigRecord | None, seed: int) -> list[int]:
    """Fill the free slots with idle clients, sent the current model; returns the node ids sent work."""
    free = strategy.concurrency - len(state.in_flight)
    busy = {c.node_id for c in state.in_flight}
    idle = sorted(set(grid.get_node_ids()) - busy)
    if free <= 0 or not idle:
        return []
    rng = np.random.default_rng([seed, ASYNC_STREAM, state.dispatches])
    state.dispatches += 1
    chosen = sorted(idle[int(i)] for i in rng.choice(len(idle), size=min(free, len(idle)), replace=False))
    content = strategy.dispatch_record(state.version + 1, arrays, ConfigRecord(dict(train_config or {})))
    messages = list(strategy._construct_messages(content, chosen, MessageType.TRAIN))
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
    for node_id in chosen:
        node = _node_round(node_id, content, replies.get(node_id), timeout)
        trip = clock.round_trip(node) if node.reply is not None else 0.0
        state.in_flight.append(Call(node_id, state.version, state.now, state.now + trip, content, node.wire,
                                    node.error, node.partition_id, trip))
    return chosen


def _aggregate(state: AsyncState, strategy: AsyncStrategy, codec: Codec, arrays: ArrayRecord, server_step: int,
               inversion: StaleInversion | None = None
               ) -> tuple[list[NodeRound], ArrayRecord | None, dict[str, float], list[int], list[Inverted]]:
    """Decode the buffer (each reply against the model it was sent), convert the stale updates when the
    strategy inverts them, then the strategy's step."""
    calls = list(state.buffer)
    nodes = [c.node_round() for c in calls]
    by_version: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        if c.wire is not None:
            by_version.setdefault(c.version, []).append(i)
    for version, idx in sorted(by_version.items()):
        _decode_replies([nodes[i] for i in idx], codec, calls[idx[0]].sent["arrays"], version + 1)
    updates, staleness = [], []
    for call, node in zip(calls, nodes):
        if node.reply is None:
            continue
        bad = nonfinite(node.reply)
        if bad is not None:
            node.reply, node.error = None, (f"non-finite update: {bad} holds NaN or inf (the client's local "
                                            f"training diverged; a smaller train.lr may help)")
            continue
        examples = float(node.reply["metrics"].get("num-examples", 1))
        updates.append(AsyncUpdate(node.reply, call.sent["arrays"], state.version - call.version, examples,
                                   call.sent["config"], call.partition_id))
        staleness.append(state.version - call.version)
    inverted: list[Inverted] = []
    if inversion is not None:
        for i, update in enumerate(updates):
            if inversion.due(update):
                inverted.append(inversion.convert(update, arrays, server_step))
                updates[i] = inverted[-1].update
    if not updates:
        return nodes, None, {}, staleness, inverted
    new_arrays, metrics = strategy.aggregate_updates(server_step, arrays, updates)
    return nodes, new_arrays, {**_mean_metrics(nodes), **metrics}, staleness, inverted


def _mean_metrics(nodes: list[NodeRound]) -> dict[str, float]:
    """The example-weighted mean of the metrics every update reported (as Flower's FedAvg aggregates them)."""
    records = [n.reply["metrics"] for n in nodes if n.reply is not None]
    keys = set.intersection(*(set(r.keys()) for r in records)) - {"num-examples"} if records else set()
    weights = [float(r.get("num-examples", 1)) for r in records]
    total = sum(weights) or 1.0
    return {k: sum(float(r[k]) * w for r, w in zip(records, weights)) / total for k in sorted(keys)}


def run_async(strategy: AsyncStrategy, grid: MeteredGrid, codec: Codec, initial_arrays: ArrayRecord, num_steps: int,
              timeout: float, observers: Sequence[RoundObserver], clock: VirtualClock, state: AsyncState, seed: int,
              train_config: ConfigRecord | None = None, first_step: int = 1,
              inversion: StaleInversion | None = None) -> ArrayRecord:
    """Run ``num_steps`` server steps (``train.rounds``); returns the final global arrays. ``state`` is
    also among ``observers`` (checkpointed); ``first_step`` > 1 continues from it (``fedsim resume``).
    ``inversion``: the converter of stale updates (``staleness: invert``), or None."""
    arrays = initial_arrays
    if first_step == 1:
        for observer in observers:
            observer.on_start(arrays)
    step, started, dispatched = first_step, time.perf_counter(), []
    while step <= num_steps:
        if not state.in_flight or min(c.finish_s for c in state.in_flight) > state.now:
            dispatched += _dispatch(state, strategy, grid, arrays, clock, timeout, train_config, seed)
        if not state.in_flight:
            raise RuntimeError("no client can be sent work (every node busy or none connected)")
        call = min(state.in_flight, key=lambda c: (c.finish_s, c.node_id))
        state.in_flight.remove(call)
        state.now = max(state.now, call.finish_s)  # a reply that came while the server was inverting waits
        state.buffer.append(call)
        delivered = sum(c.wire is not None for c in state.buffer)
        failed = len(state.buffer) - delivered
        if delivered < strategy.buffer_size and failed < strategy.concurrency:
            continue
        nodes, new_arrays, metrics, staleness, inverted = _aggregate(state, strategy, codec, arrays, step, inversion)
        row = {"round": step, "staleness": staleness}
        if inversion is not None:
            state.now += inversion.server_seconds(inverted)
            row.update(inverted=len(inverted),
                       invert_wall_s=float(np.mean([i.wall_s for i in inverted])) if inverted else None)
        bytes_up, bytes_down = grid.take_round()
        if new_arrays is not None and (bad := nonfinite(new_arrays)) is not None:
            raise ModelDiverged(f"the global model diverged in step {step}: after aggregation {bad} holds NaN or "
                                f"inf; stopping (a smaller train.lr or server step may help)")
        record = RoundRecord(step, arrays, nodes, new_arrays if new_arrays is not None else arrays, metrics,
                             bytes_up, bytes_down, started, row, codec,
                             state.now - state.last_step_s, dispatched=dispatched)
        state.version += new_arrays is not None
        state.last_step_s, state.buffer = state.now, []
        arrays = record.arrays
        for observer in observers:
            observer.on_round(record)
        step, started, dispatched = step + 1, time.perf_counter(), []
    return arrays
