"""The standard round observers, in the order the server runs them.

Each reads the ``RoundRecord`` and adds its fields to ``record.row`` (the round's
metrics.jsonl line); the results writer then writes the row and the progress bar shows it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from flwr.app import ArrayRecord
from torch import nn

from strategies.records import to_torch

from .progress import RoundProgress
from .results import ResultsWriter
from .rounds import RoundObserver, RoundRecord, RunStopped


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y); NaNs for an empty set."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return loss / len(y), correct / len(y)


class CentralEvaluation(RoundObserver):
    """Accuracy and loss of the global model on the central test split (round 0 too)."""

    state_key = "evaluation"

    def __init__(self, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                 device: torch.device | str = "cpu"):
        # The test split goes to the device once; each round only the global arrays are copied there.
        self.model, self.x, self.y = model.to(device), x_test.to(device), y_test.to(device)
        self.initial: dict[str, float] = {}

    def state_dict(self) -> dict[str, float]:
        return dict(self.initial)  # the round-0 evaluation summary.json reports

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.initial = dict(state)

    def _evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        self.model.load_state_dict(to_torch(arrays))
        loss, acc = evaluate(self.model, self.x, self.y)
        return {"accuracy": acc, "loss": loss}

    def on_start(self, arrays: ArrayRecord) -> None:
        self.initial = self._evaluate(arrays)

    def on_round(self, record: RoundRecord) -> None:
        record.row.update(self._evaluate(record.arrays))


class RoundTiming(RoundObserver):
    """Traffic, participation, the example-weighted train loss, the strategy's aggregated
    train metrics, and the round's wall time (up to this observer, evaluation included)."""

    def __init__(self, run_started: float):
        self.run_started = run_started

    def on_round(self, record: RoundRecord) -> None:
        loss_sum = weight = 0.0
        for node in record.replies:
            metrics = node.reply.get("metrics")
            if metrics is not None and "train_loss" in metrics:
                w = float(metrics.get("num-examples", 1))
                loss_sum += float(metrics["train_loss"]) * w
                weight += w
        now = time.perf_counter()
        record.row.update({
            "bytes_up": record.bytes_up, "bytes_down": record.bytes_down,
            "participants": len(record.replies), "failures": len(record.failures),
            "train_loss": loss_sum / weight if weight else None,
            "wall_s": now - record.started, "elapsed_s": now - self.run_started,
            "train_metrics": {k: float(v) for k, v in record.train_metrics.items()},
        })
        if record.failures:  # why each failed node failed (its error reply's reason, or the timeout)
            record.row["failure_reasons"] = {str(n.node_id): n.error for n in record.failures}


class StrategyReport(RoundObserver):
    """The strategy's own per-round fields (FedCE's contributions, FedImpro's known classes)."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def on_round(self, record: RoundRecord) -> None:
        record.row.update(self.strategy.round_report(record.server_round))


class DefenseReport(RoundObserver):
    """A defense's privacy figures after the round (epsilon spent so far, delta ...)."""

    def __init__(self, defense: Any):
        self.defense = defense

    def on_round(self, record: RoundRecord) -> None:
        self.defense.on_round(record)  # per-node replies (each participant's epsilon ...)
        record.row.update(self.defense.report())


class CodecReport(RoundObserver):
    """The upload codec's fields: its name, the direction it compressed, its DP statement if any."""

    def __init__(self, codec: Any):
        self.codec = codec

    def on_round(self, record: RoundRecord) -> None:
        record.row.update(self.codec.report(record.server_round))


class ResultsObserver(RoundObserver):
    def __init__(self, writer: ResultsWriter):
        self.writer = writer

    def on_round(self, record: RoundRecord) -> None:
        self.writer.add_round(record.row)


class ProgressObserver(RoundObserver):
    def __init__(self, bar: RoundProgress):
        self.bar = bar

    def on_round(self, record: RoundRecord) -> None:
        self.bar.advance(record.row)


ALL_FAILED_ROUNDS = 3  # rounds in a row in which every sampled client failed before a run stops


class AllClientsFailed(RunStopped):
    """Every sampled client failed for ``ALL_FAILED_ROUNDS`` rounds in a row: the run stops."""


class FailureWatch(RoundObserver):
    """Says why clients fail: each distinct reason once on stderr (the reason Flower would log at a
    level fedsim silences), a count per reason for summary.json, and a stop with the reason when
    every sampled client failed ``patience`` rounds in a row (settings that pass validation but
    break every client, e.g. an lr that overflows, would otherwise give an exit-0 run that never
    trained). Runs after the results writer, so the rounds that failed are on disk."""

    state_key = "failures"

    def __init__(self, patience: int = ALL_FAILED_ROUNDS, stream: TextIO | None = None):
        self.patience, self.stream = patience, stream
        self.reasons: dict[str, int] = {}
        self.streak = 0

    def state_dict(self) -> tuple[dict[str, int], int]:
        return dict(self.reasons), self.streak

    def load_state_dict(self, state: tuple[dict[str, int], int]) -> None:
        reasons, self.streak = state
        self.reasons = dict(reasons)

    def on_round(self, record: RoundRecord) -> None:
        for node in record.failures:
            reason = (node.error or "unknown").strip().splitlines()[0][:300] if (node.error or "").strip() else "unknown"
            if reason not in self.reasons:
                print(f"fedsim: client failure (round {record.server_round}, node {node.node_id}): {reason}",
                      file=self.stream or sys.stderr)
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.streak = self.streak + 1 if record.nodes and not record.replies else 0
        if self.streak >= self.patience:
            last = (record.failures[0].error or "unknown").strip().splitlines()[0][:300]
            raise AllClientsFailed(f"every client failed in rounds {record.server_round - self.streak + 1}-"
                                   f"{record.server_round}; stopping (last reason: {last})")
