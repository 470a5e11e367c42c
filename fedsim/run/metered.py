"""A Grid wrapper that counts what really travels, per round.

bytes_down: the serialised arrays of every message sent; bytes_up: those of every reply,
as encoded by the upload codec (``ArrayRecord.count_bytes``: the NumPy-serialised payload
of each array plus its key).
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
        self.bytes_up = self.bytes_down = 0

    def take_round(self) -> tuple[int, int]:
        """(bytes_up, bytes_down) since the last call."""
        out = (self.bytes_up, self.bytes_down)
        self.bytes_up = self.bytes_down = 0
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
        self._count_sent(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count_replies(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._count_sent(messages)
        replies = sorted(self.inner.send_and_receive(messages, timeout=timeout),
                         key=lambda m: m.metadata.src_node_id)
        self._count_replies(replies)
        return replies

    def _count_sent(self, messages: list[Message]) -> None:
        self.bytes_down += sum(payload_bytes(m.content) for m in messages if m.has_content())

    def _count_replies(self, replies: list[Message]) -> None:
        self.bytes_up += sum(payload_bytes(m.content) for m in replies if not m.has_error())
