"""The one place fedsim touches Flower's internal task identity.

In flwr 1.41 ``Message(...)`` reads ``flwr.supercore.task_identity.TaskIdentity`` for its
run and source node; Flower's own runtimes set it before running a ServerApp. fedsim's
engines run the ServerApp themselves, so they set it here. tests/test_engines.py fails
loudly if an upgrade moves or renames it.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


def enter_server_identity(run_id: int, task_id: int = 1) -> None:
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
