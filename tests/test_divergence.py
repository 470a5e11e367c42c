"""A diverged model is a failure, not a good run (issue 21, item 3): a client whose update holds
NaN or inf fails with that reason and is left out of the aggregate; a global model that becomes
non-finite stops the run with the reason and exit 1, keeping the rounds before."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.run.rounds import nonfinite
from strategies import register_strategy
from strategies.base import ClientAlgorithm, NoParams, StrategySpec
from strategies.fedavg import FedAvgStrategy
from strategies.records import to_record
from tests.conftest import small_raw

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


class _NaNOnPartition0(ClientAlgorithm):
    """Healthy local SGD, except partition 0, whose weights come back NaN."""

    def train(self, job):
        trainer = job.trainer()
        upload = job.upload(trainer, trainer.run())
        if job.data.partition_id == 0:
            name = next(iter(upload.weights))
            upload.weights[name] = torch.full_like(upload.weights[name], float("nan"))
        return upload


class _DivergeAtRound3(FedAvgStrategy):
    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if server_round == 3:
            values = {k: v.numpy() for k, v in arrays.items()}
            name = next(iter(values))
            values[name] = np.full_like(values[name], np.inf)
            arrays = to_record(values)
        return arrays, metrics


class _Plain(ClientAlgorithm):
    def train(self, job):
        trainer = job.trainer()
        return job.upload(trainer, trainer.run())


register_strategy(StrategySpec("test_nan_client", NoParams, lambda p, s: FedAvgStrategy(s), _NaNOnPartition0))
register_strategy(StrategySpec("test_diverging_server", NoParams, lambda p, s: _DivergeAtRound3(s), _Plain))


def test_a_huge_lr_exits_1_naming_the_divergence_and_keeps_the_rounds(tmp_path):
    """`train.lr=1e30` gave loss null every round, 0 failures, exit 0."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(small_raw(train__rounds=6)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedsim", str(scenario), "--set", "train.lr=1e30", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert err[-1].startswith("fedsim: error: every client failed in rounds 1-3"), err
    assert "non-finite update" in err[-1] and "diverged" in err[-1] and "metrics.jsonl" in err[-1]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]  # the rounds it ran are kept, and say why they failed
    assert all(r["participants"] == 0 and r["failures"] == 4 for r in rows)
    assert all("non-finite update" in reason for reason in rows[0]["failure_reasons"].values())
    assert not (out / "summary.json").exists()


def test_a_global_model_that_becomes_non_finite_stops_with_exit_1_and_keeps_the_rounds_before(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(strategy={"name": "test_diverging_server"}, train__rounds=6)))
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fedsim: error: the global model diverged in round 3") and "NaN or inf" in err[0]
    assert [r["round"] for r in read_metrics(tmp_path / "out")] == [1, 2]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_non_finite_client_update_is_a_failure_with_its_reason_not_aggregated(tmp_path, capsys):
    raw = small_raw(strategy={"name": "test_nan_client"}, train__rounds=2)
    from fedsim.scenario import parse_scenario

    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert all(r["participants"] == 3 and r["failures"] == 1 for r in rows)
    assert all(len(r["failure_reasons"]) == 1 and "non-finite update" in next(iter(r["failure_reasons"].values()))
               for r in rows)
    assert all(r["loss"] is not None and np.isfinite(r["loss"]) for r in rows)  # the NaN was left out
    assert summary["failures_total"] == 2 and sum(summary["failure_reasons"].values()) == 2
    assert capsys.readouterr().err.count("non-finite update") == 1  # each reason once on stderr
    json.loads((tmp_path / "summary.json").read_text())


def test_nonfinite_reads_only_float_arrays_and_names_the_first_bad_one():
    from flwr.app import RecordDict

    good = to_record({"w": np.ones(3, np.float32), "n": np.array([2**31 - 1], np.int64)})
    assert nonfinite(good) is None and nonfinite(RecordDict({"arrays": good})) is None
    bad = to_record({"w": np.ones(3, np.float32), "b": np.array([0.0, np.nan], np.float64)})
    assert nonfinite(bad) == "b" and nonfinite(RecordDict({"arrays": bad})) == "arrays.b"
