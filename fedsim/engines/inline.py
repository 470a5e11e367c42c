"""The inline engine: an in-process Flower Grid that calls the ClientApp directly.

No Ray, no serialisation (each client gets a copy of its message), no start-up cost; the same ServerApp and ClientApp as every
other engine. Each node keeps its own ``Context`` (so ``Context.state`` persists across
rounds exactly as on a SuperNode). A ClientApp that raises becomes an error reply, as
on a real SuperNode, and the round goes on.
"""

from __future__ import annotations

import copy
import itertools
import traceback
from collections.abc import Iterable, Iterator, MutableMapping

from flwr.app import Context, Error, Message, RecordDict
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


class InlineGrid(SimulatedNodesGrid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1):
        super().__init__(num_nodes, run_config, run_id)
        self.client_app = client_app

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = self.assign_id(msg)
            self._replies[mid] = call_client(self.client_app, own_copy(msg), self.contexts[msg.metadata.dst_node_id])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
