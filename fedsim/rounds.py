"""The server's round loop, and each round as data: a ``RoundRecord`` handed to observers.

Flower's ``Strategy.start`` runs the same configure/send/aggregate sequence, but its only
hook is a central-evaluation callback that sees the new arrays and nothing of what was
sent or received. Here the end of a round is an explicit event carrying everything that
happened in it (what each node was sent, with which config; each decoded reply; the
partition ids the clients stated; the strategy's aggregated metrics; the bytes on the
wire), and evaluation, the strategy's report, the results writer and the progress bar
are observers of it, in order. The privacy audit is one more observer.

The strategy may be any Flower message-API ``Strategy`` (a fedsim strategy, or one
wrapped by Flower's DP wrappers). Client-side evaluation rounds are not run: fedsim
evaluates centrally, and clients report their own validation figures as train metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy

from strategies.compression import Codec
from strategies.records import fast_reading

from .metered import MeteredGrid


@dataclass
class NodeRound:
    """One sampled node's part of a round: what it was sent and what came back (decoded)."""

    node_id: int
    sent: RecordDict                  # the message content it received (arrays, config, extras)
    reply: RecordDict | None = None   # decoded reply content, None on failure
    error: str | None = None          # the failure's reason
    partition_id: int | None = None   # as the client's "fedsim" record states it

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

    @property
    def replies(self) -> list[NodeRound]:
        return [n for n in self.nodes if n.reply is not None]

    @property
    def failures(self) -> list[NodeRound]:
        return [n for n in self.nodes if n.reply is None]


class RoundObserver:
    """Sees the initial arrays, every round, and the end of the run. Override what you need."""

    def on_start(self, arrays: ArrayRecord) -> None:
        pass

    def on_round(self, record: RoundRecord) -> None:
        pass


def _node_round(node_id: int, sent: RecordDict, reply: Message | None, codec: Codec,
                arrays_sent: ArrayRecord) -> NodeRound:
    node = NodeRound(node_id, sent)
    if reply is None:
        node.error = "no reply"
    elif reply.has_error():
        node.error = reply.error.reason
    else:
        fedsim = reply.content.get("fedsim")
        node.partition_id = int(fedsim["partition-id"]) if fedsim is not None else None
        node.reply = codec.decode(reply.content, arrays_sent)
        for key, record in node.reply.array_records.items():
            node.reply[key] = fast_reading(record)  # Flower's aggregation reads every array
    return node


def run_rounds(strategy: Strategy, grid: MeteredGrid, codec: Codec, initial_arrays: ArrayRecord,
               num_rounds: int, timeout: float, observers: Sequence[RoundObserver],
               train_config: ConfigRecord | None = None) -> ArrayRecord:
    """Train for ``num_rounds``; returns the final global arrays. ``train_config`` is passed to
    every ``configure_train`` (defenses add settings there, as Flower's DP wrappers do)."""
    arrays = initial_arrays
    for observer in observers:
        observer.on_start(arrays)
    for server_round in range(1, num_rounds + 1):
        started = time.perf_counter()
        config = ConfigRecord(dict(train_config or {}))  # a fresh copy: wrappers write into it
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        sent = {m.metadata.dst_node_id: m.content for m in messages}
        replies: Iterable[Message] = grid.send_and_receive(messages, timeout=timeout)
        by_node = {m.metadata.src_node_id: m for m in replies}
        nodes = [_node_round(n, sent[n], by_node.get(n), codec, arrays) for n in sorted(sent)]
        for node in nodes:  # the strategy aggregates what the codec decoded
            if node.reply is not None:
                by_node[node.node_id].content = node.reply
        new_arrays, metrics = strategy.aggregate_train(server_round, [by_node[n] for n in sorted(by_node)])
        bytes_up, bytes_down = grid.take_round()
        record = RoundRecord(server_round, arrays, nodes, new_arrays if new_arrays is not None else arrays,
                             dict(metrics or {}), bytes_up, bytes_down, started, {"round": server_round})
        arrays = record.arrays
        for observer in observers:
            observer.on_round(record)
    return arrays
