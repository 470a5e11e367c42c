"""The server's round loop, and each round as data: a ``RoundRecord`` handed to observers.

Flower's ``Strategy.start`` runs the same configure/send/aggregate sequence, but its only
hook is a central-evaluation callback that sees the new arrays and nothing of what was
sent or received. Here the end of a round is an explicit event carrying everything that
happened in it (what each node was sent, with which config; each decoded reply; the
partition ids the clients stated; the strategy's aggregated metrics; the bytes on the
wire), and evaluation, the strategy's report, the results writer and the progress bar
are observers of it, in order. The privacy audit is one more observer.

The upload codec decodes a round's replies together, before the strategy aggregates them
(``Codec.decode_round``: a codec may aggregate in its own space, as FetchSGD does); each
``NodeRound`` keeps the reply as it travelled (``wire``) beside the decoded one.

The strategy may be any Flower message-API ``Strategy`` (a fedsim strategy, or one
wrapped by Flower's DP wrappers). Client-side evaluation rounds are not run: fedsim
evaluates centrally, and clients report their own validation figures as train metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy

from strategies.compression import Codec, CodecContext
from strategies.records import decode, fast_reading

from .metered import MeteredGrid


@dataclass
class NodeRound:
    """One sampled node's part of a round: what it was sent and what came back (decoded)."""

    node_id: int
    sent: RecordDict                  # the message content it received (arrays, config, extras)
    reply: RecordDict | None = None   # decoded reply content, None on failure
    error: str | None = None          # the failure's reason
    partition_id: int | None = None   # as the client's "fedsim" record states it
    wire: RecordDict | None = None    # the reply content as it travelled, before the codec decoded it
    virtual_s: float | None = None    # its virtual round trip (fedsim.run.clock), when a system model is on

    @property
    def config(self) -> ConfigRecord:
        return self.sent["config"]


@dataclass
class RoundRecord:
    server_round: int
    arrays_sent: ArrayRecord
    nodes: list[NodeRound]                 # by node id
    arrays: ArrayRecord                    # the global arrays after aggregation
    train_metrics: dict[str, float]        # the strategy's aggregate of the clients' metrics
    bytes_up: int
    bytes_down: int
    started: float                         # time.perf_counter() when the round began
    row: dict[str, Any] = field(default_factory=dict)  # the metrics.jsonl row observers fill
    codec: Codec | None = None             # the upload codec that decoded the replies
    virtual_s: float | None = None         # the round's virtual duration (fedsim.run.clock), or None
    dispatched: list[int] = field(default_factory=list)  # asynchronous steps: nodes sent work (and so trained)
                                                         # since the last step, beside ``nodes`` (delivered)

    def support(self, node: NodeRound) -> dict[str, Any] | None:
        """Per float entry, the bool mask of the coordinates ``node``'s reply carried (top-k, DGC); None when
        every coordinate travelled in some form (dense, sign, TernGrad, sketches, EF21's sent + g_i)."""
        if self.codec is None or node.wire is None:
            return None
        return self.codec.support(node.wire, self.arrays_sent)

    @property
    def replies(self) -> list[NodeRound]:
        return [n for n in self.nodes if n.reply is not None]

    @property
    def failures(self) -> list[NodeRound]:
        return [n for n in self.nodes if n.reply is None]


class RoundClock(Protocol):
    """Times a round on the clients' devices (``fedsim.run.clock.VirtualClock``): stamps each node's
    virtual round trip, turns the stragglers past a deadline into failures, returns the round's duration."""

    def time_round(self, nodes: list[NodeRound]) -> float: ...


class RunStopped(RuntimeError):
    """A run that cannot go on stops with this one-line reason (the CLI prints it and exits 1);
    the rounds it reported are kept in metrics.jsonl."""


class ModelDiverged(RunStopped):
    """The global model became non-finite (NaN or inf) after a round's aggregation."""


def nonfinite(record: RecordDict | ArrayRecord) -> str | None:
    """The first array (by its record's and its own name) holding a NaN or inf, or None when every
    float array is finite: one ``isfinite`` pass over each array's bytes, no copy."""
    records = record.items() if isinstance(record, ArrayRecord) else None
    if records is not None:
        for name, array in records:
            if not _finite(array):
                return name
        return None
    for key, arrays in record.array_records.items():
        for name, array in arrays.items():
            if not _finite(array):
                return f"{key}.{name}"
    return None


def _finite(array) -> bool:
    values = decode(array)
    return values.dtype.kind not in "fc" or bool(np.isfinite(values).all())


class RoundObserver:
    """Sees the initial arrays, every round, and the end of the run. Override what you need.

    An observer whose state the next round depends on names it ``state_key`` and gives it as
    ``state_dict`` (picklable); the checkpoint keeps it under that key and a resumed run hands it
    back to ``load_state_dict``, so checkpoint and resume need no code per observer."""

    state_key: str | None = None  # set by observers with state (unique in a run)

    def on_start(self, arrays: ArrayRecord) -> None:
        pass

    def on_round(self, record: RoundRecord) -> None:
        pass

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


def _node_round(node_id: int, sent: RecordDict, reply: Message | None, timeout: float) -> NodeRound:
    """The node's round with its reply as it arrived (still encoded)."""
    node = NodeRound(node_id, sent)
    if reply is None:  # a failure like any other, with its reason
        node.error = f"timeout: no reply within engine.timeout_s ({timeout:g} s)"
    elif reply.has_error():
        node.error = reply.error.reason
    else:
        fedsim = reply.content.get("fedsim")
        node.partition_id = int(fedsim["partition-id"]) if fedsim is not None else None
        node.reply = node.wire = reply.content
    return node


def _decode_replies(nodes: list[NodeRound], codec: Codec, arrays_sent: ArrayRecord, server_round: int) -> None:
    """The codec reads the round's replies (once, together: a codec may aggregate in its own space)."""
    ok = [n for n in nodes if n.reply is not None]
    if not ok:
        return
    config = ok[0].config
    ctx = CodecContext(seed=int(config.get("codec-seed", 0)), server_round=server_round)
    for node, content in zip(ok, codec.decode_round([n.reply for n in ok], arrays_sent, ctx)):
        for key, record in content.array_records.items():
            content[key] = fast_reading(record)  # Flower's aggregation reads every array
        node.reply = content


def run_rounds(strategy: Strategy, grid: MeteredGrid, codec: Codec, initial_arrays: ArrayRecord,
               num_rounds: int, timeout: float, observers: Sequence[RoundObserver],
               train_config: ConfigRecord | None = None, first_round: int = 1,
               clock: RoundClock | None = None) -> ArrayRecord:
    """Train for ``num_rounds``; returns the final global arrays. ``train_config`` is passed to
    every ``configure_train`` (defenses add settings there, as Flower's DP wrappers do).

    ``first_round`` > 1 continues a run (``fedsim resume``) from the arrays after round
    ``first_round - 1``: its start has happened, so ``on_start`` is not called again (the
    observers come back from the checkpoint).

    ``clock``: the virtual clock; it times the round before the codec decodes the replies, so a
    straggler it drops reaches neither the codec's server state nor the aggregate."""
    arrays = initial_arrays
    if first_round == 1:
        for observer in observers:
            observer.on_start(arrays)
    for server_round in range(first_round, num_rounds + 1):
        started = time.perf_counter()
        config = ConfigRecord(dict(train_config or {}))  # a fresh copy: wrappers write into it
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        sent = {m.metadata.dst_node_id: m.content for m in messages}
        replies: Iterable[Message] = grid.send_and_receive(messages, timeout=timeout)
        by_node = {m.metadata.src_node_id: m for m in replies}
        nodes = [_node_round(n, sent[n], by_node.get(n), timeout) for n in sorted(sent)]
        virtual_s = clock.time_round(nodes) if clock is not None else None
        for node in nodes:  # the stragglers the clock dropped (a failed node's error reply stays, as before)
            if node.reply is None and node.wire is not None:
                del by_node[node.node_id]
        _decode_replies(nodes, codec, arrays, server_round)
        for node in nodes:  # the strategy aggregates what the codec decoded
            if node.reply is None:
                continue
            bad = nonfinite(node.reply)
            if bad is None:
                by_node[node.node_id].content = node.reply
            else:  # a failure with its reason, left out of the aggregate as a timed-out reply is
                node.reply, node.error = None, (f"non-finite update: {bad} holds NaN or inf (the client's "
                                                f"local training diverged; a smaller train.lr may help)")
                del by_node[node.node_id]
        new_arrays, metrics = strategy.aggregate_train(server_round, [by_node[n] for n in sorted(by_node)])
        bytes_up, bytes_down = grid.take_round()
        if new_arrays is not None and (bad := nonfinite(new_arrays)) is not None:
            raise ModelDiverged(f"the global model diverged in round {server_round}: after aggregation {bad} holds "
                                f"NaN or inf; stopping (a smaller train.lr or server step may help)")
        record = RoundRecord(server_round, arrays, nodes, new_arrays if new_arrays is not None else arrays,
                             dict(metrics or {}), bytes_up, bytes_down, started, {"round": server_round}, codec,
                             virtual_s)
        arrays = record.arrays
        for observer in observers:
            observer.on_round(record)
    return arrays
