"""A Grid wrapper that counts what really travels, per round.

bytes_down: the serialised arrays of every message sent; bytes_up: those of every reply
(``ArrayRecord.count_bytes``: the NumPy-serialised payload of each array plus its key).
Works around any Grid (inline, Ray, deployment), so the count never depends on the engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid


def payload_bytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.values() if isinstance(rec, ArrayRecord))


class MeteredGrid(Grid):
    def __init__(self, inner: Grid):
        self.inner = inner
        self._reset()

    def _reset(self) -> None:
        self.bytes_up = self.bytes_down = self.participants = self.failures = 0
        self.loss_sum = self.loss_weight = 0.0

    def take_round(self) -> dict:
        """This round's counters (then reset)."""
        out = {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "participants": self.participants,
               "failures": self.failures,
               "train_loss": self.loss_sum / self.loss_weight if self.loss_weight else None}
        self._reset()
        return out

    # Grid interface ---------------------------------------------------------------
    def set_run(self, run):  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if msg.has_content():
                self.bytes_down += payload_bytes(msg.content)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_replies(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.has_content():
                self.bytes_down += payload_bytes(msg.content)
        replies = sorted(self.inner.send_and_receive(messages, timeout=timeout),
                         key=lambda m: m.metadata.src_node_id)
        self._count_replies(replies)
        return replies

    def _count_replies(self, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self.failures += 1
                continue
            self.participants += 1
            self.bytes_up += payload_bytes(reply.content)
            metrics = reply.content.get("metrics")
            if metrics is not None and "train_loss" in metrics:
                weight = float(metrics.get("num-examples", 1))
                self.loss_sum += float(metrics["train_loss"]) * weight
                self.loss_weight += weight
