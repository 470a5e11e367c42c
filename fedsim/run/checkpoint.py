"""A run's checkpoint: everything the next round depends on, so ``python -m fedsim resume RUN_DIR``
continues a killed run and ends with the metrics the run would have had left alone.

What the next round depends on, and where it lives:
- the global arrays (``ArrayRecord``) after the round;
- the server objects: the strategy (SCAFFOLD's ``c``, FedCE's scores ...), the strategy the rounds
  run (Flower's DP wrappers around it, with their clipping norm and accountant), the defenses (their
  epsilons, the accountant they share with the wrapper) and the upload codec (EF21's estimates,
  FetchSGD's sketches). One pickle holds them all, so an object two of them share (the wrapped
  strategy, an accountant) is still one object after loading;
- every node's ``Context.state`` (residuals, control variates, DP-SGD's accountant history) that a
  round has touched: a node no message reached still has its empty state;
- the observers' state: the initial evaluation, the failure counts, the audit's finished rows and
  its attacks still in flight (resubmitted on resume), the wall time so far.
Random streams need nothing: every stream is keyed by (seed, round[, client]) (client sampling,
local training, which also reseeds torch's global generator before every client's training, DP
noise, codecs, the audit); Flower's DP wrappers draw from NumPy's global generator, reseeded per
round. The byte counters (``MeteredGrid``) start afresh every round. metrics.jsonl is not in the
checkpoint: the resumed run keeps its rows up to the checkpoint's round and redoes the rest
(``kept_rows``). Not carried: a client call the inline engine abandoned past ``engine.timeout_s``
and still running at the kill (its node would answer again at once after a resume).

The file is a pickle: it is fedsim's own file in the run's own folder, read back only by
``fedsim resume`` on that folder (like any pickle, never load one from elsewhere). Tensors and
ArrayRecords round-trip bit for bit. The World (data set, splits) is never in it: resume rebuilds it
from the scenario. Written atomically (temporary file, then rename): a kill leaves the previous
checkpoint or the new one. A completed run removes it (summary.json marks the run complete).
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from .results import _FILE_MODE, disk_full_as_error, read_metrics
from .rounds import RoundObserver, RoundRecord

CHECKPOINT = "checkpoint.pkl"
FORMAT = 1  # bumped when the layout changes: an older file is refused, not misread


class CheckpointError(Exception):
    """The run folder's checkpoint is missing, unreadable or not this run's (one line)."""


@dataclass
class Checkpoint:
    server_round: int                   # the last round it holds (completed, observed, in metrics.jsonl)
    scenario_yaml: str                  # the run's resolved scenario: resume refuses another one
    arrays: ArrayRecord                 # the global arrays after ``server_round``
    server: dict[str, Any]              # strategy, running (the wrapped one), defenses, codec
    node_states: dict[int, bytes]       # node id -> its pickled Context.state (touched nodes, state not empty)
    observers: dict[str, Any]           # evaluation, failures, audit
    elapsed_s: float                    # the run's wall time up to the checkpoint
    format: int = FORMAT

    def restore_nodes(self, contexts) -> None:
        """Give each node its state back (``contexts``: the engine grid's NodeContexts)."""
        for node_id, state in self.node_states.items():
            contexts[node_id].state = pickle.loads(state)


# Flower's RDP accountant holds the dp-accounting modules it imported; it pickles through its own
# state_dict (Flower's event ledger, replayed in the same order: the same epsilon to the last bit).
def _rdp_accountant(config, state: dict) -> RdpAccountant:
    accountant = RdpAccountant(config, orders=tuple(state["orders"]))
    accountant.load_state_dict(state)
    return accountant


def _reduce_rdp(accountant: RdpAccountant):
    return _rdp_accountant, (accountant.config, accountant.state_dict())


_DISPATCH = {**copyreg.dispatch_table, RdpAccountant: _reduce_rdp}


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(obj)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with disk_full_as_error(path):  # a full disk: DiskFullError, the previous checkpoint kept
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic, as results.atomic_write (no fsync, for the same reason)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def disk_full_line(exc: Exception, run_dir: str | Path) -> str:
    """The one line for a run stopped by a full disk (``results.DiskFullError``): what to do next."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).is_file():
        return (f"fedsim: error: {exc}; rounds so far are in {run_dir / 'metrics.jsonl'}; free some space, then "
                f"continue with `python -m fedsim resume {run_dir}`")
    return f"fedsim: error: {exc}; free some space and run it again"


def load(run_dir: str | Path, scenario_yaml: str | None = None) -> Checkpoint:
    """The run's checkpoint; CheckpointError when there is none, it cannot be read, or (given
    ``scenario_yaml``) it belongs to another scenario."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CHECKPOINT} (output.checkpoint_every: 0, or the run stopped "
                              "before its first checkpoint); run the scenario again")
    try:
        with open(path, "rb") as fh:
            ckpt = pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same bad input
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, Checkpoint) or ckpt.format != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this fedsim version")
    if scenario_yaml is not None and ckpt.scenario_yaml != scenario_yaml:
        raise CheckpointError(f"{path}: written for another scenario than {Path(run_dir) / 'scenario.yaml'}")
    return ckpt


def kept_rows(run_dir: str | Path, server_round: int) -> list[dict[str, Any]]:
    """metrics.jsonl's rows up to the checkpoint's round (those after it are redone; a torn last
    line is left out by read_metrics); CheckpointError when any of those rounds is missing."""
    rows = [r for r in read_metrics(run_dir) if r["round"] <= server_round]
    if [r["round"] for r in rows] != list(range(1, server_round + 1)):
        raise CheckpointError(f"{run_dir}: metrics.jsonl lacks rounds of the checkpoint (round {server_round})")
    return rows


@dataclass
class Checkpointer(RoundObserver):
    """Writes the checkpoint every ``every`` rounds and after the last one. The last observer: the
    round's row is in metrics.jsonl and every other observer has seen the round.

    ``server_state(record)`` gives the arrays, the server objects and the observers' state;
    ``contexts`` is the engine grid's NodeContexts. Nodes are pickled when a round touched them
    since the last checkpoint (a node's state changes only when it trains), so a run of many
    clients, few a round, does not re-pickle every node every round; empty states are left out."""

    run_dir: Path
    every: int
    num_rounds: int
    scenario_yaml: str
    contexts: Any
    server_state: Callable[[RoundRecord], dict[str, Any]]
    started: float                      # time.perf_counter() of the run's start (resume: shifted back)
    node_states: dict[int, bytes] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)

    def on_round(self, record: RoundRecord) -> None:
        if not self.every:
            return
        self.touched.update(n.node_id for n in record.nodes)
        self.touched.update(record.dispatched)  # asynchronous: trained, not yet delivered
        if record.server_round % self.every and record.server_round != self.num_rounds:
            return
        try:
            for node_id in sorted(self.touched):
                state = self.contexts[node_id].state
                if len(state):
                    self.node_states[node_id] = dumps(state)
                else:  # an empty state is what a node gets anyway (FedAvg's: every node's)
                    self.node_states.pop(node_id, None)
            self.touched.clear()
            state = self.server_state(record)
            data = dumps(Checkpoint(record.server_round, self.scenario_yaml, state["arrays"], state["server"],
                                    self.node_states, state["observers"], time.perf_counter() - self.started))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # A strategy or codec of the user's own holding something pickle cannot take (a lambda, a
            # lock): the run goes on without checkpoints rather than stopping for a feature it did not use.
            self.every = 0
            print(f"fedsim: no checkpoints for this run (fedsim resume cannot continue it): the state of round "
                  f"{record.server_round} does not pickle: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                  file=sys.stderr)
            return
        _write(Path(self.run_dir) / CHECKPOINT, data)

    def resume_from(self, ckpt: Checkpoint) -> None:
        self.node_states = dict(ckpt.node_states)
        for stale in Path(self.run_dir).glob(f".{CHECKPOINT}.*.tmp"):  # a write the kill cut short
            stale.unlink(missing_ok=True)

    def remove(self) -> None:
        """The run is complete (summary.json written): nothing is left to resume."""
        (Path(self.run_dir) / CHECKPOINT).unlink(missing_ok=True)


__all__ = ["CHECKPOINT", "Checkpoint", "CheckpointError", "Checkpointer", "disk_full_line", "kept_rows", "load"]
