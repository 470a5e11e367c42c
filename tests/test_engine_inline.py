"""End to end on the inline engine: outputs, determinism, failing clients, client state."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsim.engines import run_scenario
from fedsim.engines.identity import enter_server_identity
from fedsim.run.results import read_metrics
from strategies import register_strategy
from strategies.base import ClientAlgorithm, NoParams, StrategySpec
from strategies.fedavg import FedAvgStrategy

ROW_KEYS = {"round", "accuracy", "loss", "bytes_up", "bytes_down", "wall_s", "participants", "failures"}
SUMMARY_KEYS = {"accuracy", "rounds", "bytes_up_total", "bytes_down_total", "wall_s"}


def _numbers(rows):
    return [(r["accuracy"], r["loss"], r["train_loss"], r["bytes_up"], r["bytes_down"]) for r in rows]


def test_end_to_end_outputs(tmp_path, small_scenario):
    s = small_scenario(output={"plot": True, "progress": False})
    summary = run_scenario(s, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert SUMMARY_KEYS <= set(summary) and summary["rounds"] == 2
    assert summary["accuracy"] == rows[-1]["accuracy"]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "dataset: digits" in (tmp_path / "scenario.yaml").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["scenario"]["name"] == "small"
    # bytes are the serialised arrays: 4 clients x (32*64 + 32 + 10*32 + 10) float32 values, plus headers
    n_params = 32 * 64 + 32 + 10 * 32 + 10
    assert 4 * n_params * 4 < rows[0]["bytes_up"] < 4 * n_params * 4 * 1.1
    assert rows[0]["bytes_down"] == rows[0]["bytes_up"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_same_seed_identical_metrics(tmp_path, small_scenario):
    run_scenario(small_scenario(), tmp_path / "a", progress=False)
    run_scenario(small_scenario(), tmp_path / "b", progress=False)
    run_scenario(small_scenario(seed=1), tmp_path / "c", progress=False)
    a, b, c = (read_metrics(tmp_path / x) for x in "abc")
    assert _numbers(a) == _numbers(b)
    assert _numbers(a) != _numbers(c)


class _FailOnPartitionZero(ClientAlgorithm):
    def train(self, job):
        if job.data.partition_id == 0:
            raise RuntimeError("simulated client crash")
        trainer = job.trainer()
        trainer.run()
        return job.upload(trainer)


class _CountingClient(ClientAlgorithm):
    """Counts its own calls in Context.state."""

    def train(self, job):
        calls = int(job.state["counter"]["calls"]) + 1 if "counter" in job.state else 1
        job.state["counter"] = ConfigRecord({"calls": calls})
        trainer = job.trainer()
        return job.upload(trainer, {**trainer.run(), "calls": calls})


class _ReportCalls(FedAvgStrategy):
    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.calls = {m.metadata.src_node_id: int(m.content["metrics"]["calls"]) for m in replies}
        return super().aggregate_train(server_round, replies)

    def round_report(self, server_round):
        return {"calls": {str(k): v for k, v in sorted(self.calls.items())}}


register_strategy(StrategySpec("test_failing", NoParams, lambda p, s: FedAvgStrategy(s), _FailOnPartitionZero))
register_strategy(StrategySpec("test_counting", NoParams, lambda p, s: _ReportCalls(s), _CountingClient))


def test_failing_client_does_not_stop_the_run(tmp_path, small_scenario):
    summary = run_scenario(small_scenario(strategy={"name": "test_failing"}, train={"rounds": 3, "lr": 0.1}),
                           tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["failures"] for r in rows] == [1, 1, 1]
    assert [r["participants"] for r in rows] == [3, 3, 3]
    assert summary["rounds"] == 3 and summary["failures_total"] == 3
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] - 0.05  # it kept training


def test_client_state_survives_skipped_rounds(tmp_path, small_scenario):
    s = small_scenario(strategy={"name": "test_counting"},
                       train={"rounds": 6, "participation": 0.5, "sampling": "fixed", "lr": 0.1})
    run_scenario(s, tmp_path, progress=False)
    seen: dict[str, int] = {}
    prev: set[str] = set()
    skipped_then_back = False
    for row in read_metrics(tmp_path):
        for node, calls in row["calls"].items():
            assert calls == seen.get(node, 0) + 1  # count continues across rounds it missed
            skipped_then_back |= node in seen and node not in prev
            seen[node] = calls
        prev = set(row["calls"])
    assert skipped_then_back


def test_task_identity_guard():
    """Fails loudly if a Flower upgrade moves the internal task identity fedsim sets."""
    from flwr.supercore.task_identity import TaskIdentity

    enter_server_identity(7)
    msg = Message(RecordDict(), 1001, MessageType.TRAIN)
    assert msg.metadata.run_id == 7 and TaskIdentity.run_id == 7
    assert msg.metadata.src_node_id == TaskIdentity.node_id


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedsim", "experiments/scenarios/quickstart.yaml",
                           "--set", "train.rounds=2", "--set", "data.num_clients=3", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout
    assert len(read_metrics(out)) == 2


def test_quickstart_reaches_095(tmp_path):
    """The README's quick-start contract: >= 0.95 central test accuracy."""
    from fedsim.scenario import load_scenario

    torch.set_num_threads(1)
    summary = run_scenario(load_scenario("experiments/scenarios/quickstart.yaml"), tmp_path, progress=False)
    assert summary["accuracy"] >= 0.95


class _InterruptAtRound3(FedAvgStrategy):
    def aggregate_train(self, server_round, replies):
        if server_round == 3:
            raise KeyboardInterrupt
        return super().aggregate_train(server_round, replies)


register_strategy(StrategySpec("test_interrupt", NoParams, lambda p, s: _InterruptAtRound3(s), _CountingClient))


def test_interrupted_run_keeps_reported_rounds(tmp_path, capsys):
    import yaml

    from fedsim.cli import main
    from tests.conftest import small_raw

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(strategy={"name": "test_interrupt"}, train={"rounds": 5})))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [r["round"] for r in read_metrics(tmp_path / "out")] == [1, 2]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_node_contexts_made_on_first_use():
    """Every node is listed from the start; its Context is made (once) when first addressed."""
    from fedsim.engines.inline import NODE_ID_BASE, node_contexts

    contexts = node_contexts(100_000, 1, {"scenario-yaml": "x"})
    assert len(contexts) == 100_000 and list(contexts)[-1] == NODE_ID_BASE + 99_999
    assert contexts._made == {}  # nothing made by listing the nodes
    ctx = contexts[NODE_ID_BASE + 7]
    assert ctx.node_config == {"partition-id": 7, "num-partitions": 100_000} and ctx.node_id == NODE_ID_BASE + 7
    ctx.state["probe"] = ConfigRecord({"x": 1})
    assert contexts[NODE_ID_BASE + 7] is ctx and len(contexts._made) == 1  # state persists
    assert contexts[NODE_ID_BASE + 8].run_config == {"scenario-yaml": "x"}
    assert contexts[NODE_ID_BASE + 8].run_config is not ctx.run_config  # each node its own copy
    with pytest.raises(KeyError):
        contexts[NODE_ID_BASE + 100_000]
    with pytest.raises(KeyError):
        contexts[NODE_ID_BASE - 1] = ctx


class _AlwaysFail(ClientAlgorithm):
    def train(self, job):
        raise ValueError(f"lr {job.settings.lr} overflows on partition {job.data.partition_id}")


register_strategy(StrategySpec("test_always_failing", NoParams, lambda p, s: FedAvgStrategy(s), _AlwaysFail))


def test_failure_reasons_reach_the_rows_the_summary_and_stderr_once(tmp_path, small_scenario, capsys):
    summary = run_scenario(small_scenario(strategy={"name": "test_failing"}, train={"rounds": 3, "lr": 0.1}),
                           tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    reason = "RuntimeError: simulated client crash"
    assert all(len(r["failure_reasons"]) == 1 and reason in next(iter(r["failure_reasons"].values())) for r in rows)
    assert len(summary["failure_reasons"]) == 1 and list(summary["failure_reasons"].values()) == [3]
    err = capsys.readouterr().err
    assert err.count(reason) == 1  # each distinct reason once, not every round


def test_a_run_whose_every_client_fails_stops_with_the_reason_and_exit_1(tmp_path, small_scenario, capsys):
    from fedsim.cli import main
    from fedsim.run.observers import ALL_FAILED_ROUNDS

    path = tmp_path / "s.yaml"
    path.write_text(small_scenario(strategy={"name": "test_always_failing"}, train={"rounds": 10}).to_yaml())
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedsim: error: every client failed in rounds 1-3") and "overflows" in err[-1]
    rows = read_metrics(tmp_path / "out")
    assert len(rows) == ALL_FAILED_ROUNDS and all(r["participants"] == 0 for r in rows)  # stopped, rounds kept
    assert not (tmp_path / "out" / "summary.json").exists()


def test_rounds_are_appended_and_a_torn_last_line_is_left_out(tmp_path):
    from fedsim.run.results import ResultsWriter

    writer = ResultsWriter(tmp_path, "name: x\n")
    writer.add_round({"round": 1, "accuracy": 0.5})
    inode = (tmp_path / "metrics.jsonl").stat().st_ino
    writer.add_round({"round": 2, "accuracy": float("nan")})
    assert (tmp_path / "metrics.jsonl").stat().st_ino == inode  # appended, not rewritten by rename
    assert read_metrics(tmp_path) == [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": None}]
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "accur')  # a run killed in the middle of its append
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_missing_reply_is_a_failure_named_timeout():
    from flwr.app import RecordDict

    from fedsim.run.rounds import RoundRecord, _node_round

    node = _node_round(7, RecordDict(), None, 12.0)
    assert node.error == "timeout: no reply within engine.timeout_s (12 s)" and node.reply is None
    record = RoundRecord(1, None, [node], None, {}, 0, 0, 0.0)
    assert record.failures == [node] and record.replies == []
