"""The virtual clock of synchronous rounds: how long each round would take on the clients' devices.

The round loop (``fedsim.run.rounds.run_rounds``) asks the clock to time a round once the replies
are in and before the codec decodes them: each replying client's round trip is its device's
(``fedsim.world.system``) download of what it was sent + ``step_s`` x the local steps it ran + upload
of what it really sent (the encoded bytes, as ``MeteredGrid`` counts them). The round lasts until
its slowest client is back; with ``train.deadline_s`` the server stops waiting at the deadline, and
every client still out is a straggler: its reply is dropped before the codec and the strategy see
it, and it counts as a failure with the reason ``STRAGGLER``. Failed clients (an error, the engine's
timeout) do not hold the round up: the engine reports them, not the clock.

A straggler's own ``Context.state`` (error-feedback residuals, control variates, its DP accountant)
keeps what its training did: a real device trains and sends without knowing that the server will
stop waiting before its reply arrives. Its bytes count in ``bytes_up``: they did travel.

As an observer it adds ``virtual_s`` (the round), ``virtual_time_s`` (since the run's start) and
``stragglers`` to the round's row, and keeps the running time for checkpoint and resume.
"""

from __future__ import annotations

import math

from .metered import payload_bytes
from .rounds import NodeRound, RoundObserver, RoundRecord
from ..world.system import SystemModel

STRAGGLER = "straggler: its reply would arrive after train.deadline_s (dropped before aggregation)"


def local_steps(node: NodeRound) -> float:
    """The optimiser steps the client ran: its reply's ``local_steps`` metric (every fedsim trainer's);
    for a client algorithm that reports none, its full epochs of ``batch-size`` batches."""
    metrics = node.wire.get("metrics") if node.wire is not None else None
    if metrics is not None and "local_steps" in metrics:
        return float(metrics["local_steps"])
    config = node.config
    examples = float(metrics.get("num-examples", 0)) if metrics is not None else 0.0
    return math.ceil(examples / int(config["batch-size"])) * int(config["local-epochs"])


class VirtualClock(RoundObserver):
    state_key = "clock"

    def __init__(self, system: SystemModel, deadline_s: float | None = None):
        self.system, self.deadline_s = system, deadline_s
        self.now = 0.0  # virtual seconds since the run's start, after the last observed round
        self.stragglers = 0  # over the run

    def state_dict(self) -> tuple[float, int]:
        return self.now, self.stragglers

    def load_state_dict(self, state: tuple[float, int]) -> None:
        self.now, self.stragglers = state

    def round_trip(self, node: NodeRound) -> float:
        """The virtual round trip of ``node``'s call (it replied, stating its partition id)."""
        device = self.system[node.partition_id]
        return device.round_trip_s(payload_bytes(node.sent), local_steps(node), payload_bytes(node.wire))

    def time_round(self, nodes: list[NodeRound]) -> float:
        """Stamp each replying node's round trip (``NodeRound.virtual_s``), drop the stragglers (their
        reply set to None, their error to ``STRAGGLER``); returns the round's virtual duration."""
        for node in nodes:
            if node.reply is None:
                continue
            if node.partition_id is None:
                raise RuntimeError(f"node {node.node_id}'s reply states no partition id: the clock cannot "
                                   f"tell which device it ran on")
            node.virtual_s = self.round_trip(node)
        late = [n for n in nodes if n.reply is not None and self.deadline_s is not None and n.virtual_s > self.deadline_s]
        for node in late:
            node.reply, node.error = None, STRAGGLER
        if late:
            return float(self.deadline_s)
        return max((n.virtual_s for n in nodes if n.reply is not None), default=0.0)

    def on_round(self, record: RoundRecord) -> None:
        stragglers = sum(n.error == STRAGGLER for n in record.nodes)
        self.now += record.virtual_s or 0.0
        self.stragglers += stragglers
        record.row.update({"virtual_s": record.virtual_s, "virtual_time_s": self.now, "stragglers": stragglers})

    def summary(self) -> dict[str, float | int]:
        return {"virtual_time_s": self.now, "stragglers_total": self.stragglers}
