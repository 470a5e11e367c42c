"""``python -m fedsim resume``: a run killed (SIGKILL) or interrupted (Ctrl-C) mid-way and resumed ends
with exactly the metrics.jsonl rows, summary.json and audit.jsonl of the same run left alone (wall-time
fields aside), with server state (SCAFFOLD's c, FetchSGD's sketches, Flower's DP wrapper and its
accountant), node state (control variates, DP-SGD's accountant history) and attacks in flight."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml

from fedsim.run import apps, checkpoint
from fedsim.engines import run_scenario
from fedsim.engines.inline import InlineGrid
from fedsim.run.observers import ProgressObserver
from fedsim.run.outdir import claim_output_dir
from fedsim.run.resume import main as resume_main
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from strategies import register_strategy
from strategies.base import NoParams, StrategySpec
from strategies.fedavg import FedAvgClient, FedAvgStrategy
from strategies.records import to_record, to_torch
from tests.conftest import small_raw

REPO = Path(__file__).resolve().parents[1]
WALL = ("wall_s", "elapsed_s")  # the only fields a resumed run may differ in


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL} for r in read_metrics(out)]


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("wall_s")
    return summary


def _audit(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    return sorted(rows, key=lambda r: (r["round"], r["client"]))


def _assert_same_run(resumed: Path, alone: Path) -> None:
    assert _metrics(resumed) == _metrics(alone)
    assert _summary(resumed) == _summary(alone)
    assert not (resumed / checkpoint.CHECKPOINT).exists()  # a complete run keeps none


def _killed(raw: dict, tmp_path: Path, rows: int) -> Path:
    """``python -m fedsim`` on ``raw``, SIGKILLed once metrics.jsonl holds ``rows`` rounds."""
    path, out = tmp_path / "scenario.yaml", tmp_path / "killed"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "fedsim", str(path), "--out", str(out), "--quiet"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= rows):
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out / "summary.json").exists() and len(read_metrics(out)) < raw["train"]["rounds"]
    return out


def _interrupted(raw: dict, out: Path, at: int, monkeypatch) -> None:
    """The run in this process, Ctrl-C right after round ``at``'s row is written (before its checkpoint)."""

    class CtrlC(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            if record.server_round == at:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(apps, "ProgressObserver", CtrlC)
        with pytest.raises(KeyboardInterrupt):
            run_scenario(parse_scenario(raw), out, progress=False)
    assert [r["round"] for r in read_metrics(out)] == list(range(1, at + 1))


def test_fedavg_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path):
    raw = small_raw(train__rounds=15)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    killed = _killed(raw, tmp_path, rows=3)
    proc = subprocess.run([sys.executable, "-m", "fedsim", "resume", str(killed), "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout
    _assert_same_run(killed, tmp_path / "alone")


def test_scaffold_with_partial_participation_killed_resumes_to_the_same_metrics(tmp_path):
    raw = small_raw(strategy={"name": "scaffold"}, train__rounds=15, train__participation=0.5)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    killed = _killed(raw, tmp_path, rows=4)
    ckpt = checkpoint.load(killed)
    assert ckpt.server["strategy"].c is not None and ckpt.node_states  # SCAFFOLD's c and the clients' c_i
    assert resume_main([str(killed), "--quiet"]) == 0
    _assert_same_run(killed, tmp_path / "alone")


@pytest.mark.parametrize("extra", [
    pytest.param({"upload": {"codec": "countsketch", "ratio": 0.2, "topk": 0.05, "momentum": 0.9}}, id="countsketch"),
    pytest.param({"defense": {"name": "dp_user", "adaptive": True, "noise_multiplier": 0.05,
                              "clipped_count_stddev": 1.0}}, id="dp_user-adaptive"),
    pytest.param({"defense": {"name": "dp_sgd", "noise_multiplier": 1.0}, "train__participation": 0.5,
                  "data__num_clients": 3}, id="dp_sgd"),
    pytest.param({"output__checkpoint_every": 3}, id="every-3"),
])
def test_server_codec_and_defense_state_survive_an_interrupted_run(tmp_path, monkeypatch, extra):
    raw = small_raw(train__rounds=6, **extra)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    _interrupted(raw, tmp_path / "cut", at=5, monkeypatch=monkeypatch)
    # the row of round 5 is on disk, its checkpoint is not: resume redoes it (every 3: rounds 4, 5 too)
    assert checkpoint.load(tmp_path / "cut").server_round == (3 if "output__checkpoint_every" in extra else 4)
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "cut", tmp_path / "alone")
    if "defense" in extra:  # the DP state was there to keep
        assert _metrics(tmp_path / "alone")[-1]["epsilon"] > _metrics(tmp_path / "alone")[0]["epsilon"] > 0


def test_ctrl_c_during_a_resumed_run_and_resuming_again(tmp_path, monkeypatch, capsys):
    raw = small_raw(strategy={"name": "fedspeed"}, train__rounds=6, train__participation=0.5)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    _interrupted(raw, tmp_path / "cut", at=2, monkeypatch=monkeypatch)

    class CtrlC(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            if record.server_round == 4:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(apps, "ProgressObserver", CtrlC)
        assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 130
    assert "fedsim resume" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "cut").server_round == 3
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "cut", tmp_path / "alone")


class _AtClose(Future):
    """An attack that runs when the run waits for it (the audit's close): at every checkpoint, every
    attack so far is still in flight, whatever the machine's speed."""

    def __init__(self, fn, args):
        super().__init__()
        self.job = (fn, args)

    def result(self, timeout=None):
        if not self.done():
            fn, args = self.job
            self.set_result(fn(*args))
        return super().result(timeout)


class _AtCloseExecutor:
    def submit(self, fn, *args):
        return _AtClose(fn, args)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_audit_jobs_in_flight_are_resubmitted(tmp_path, monkeypatch):
    # The engine's executor hook (the ray engine's actor) runs the attacks; the jobs still pickle into
    # the checkpoint and back as they would from a process of their own.
    monkeypatch.setattr(InlineGrid, "audit_executor", lambda self: _AtCloseExecutor(), raising=False)
    raw = small_raw(train__rounds=4, audit={"attack": "ig", "threat": "gradient", "batch_size": 2, "clients": 1,
                                            "attack_config": {"iterations": 5}})
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    _interrupted(raw, tmp_path / "cut", at=3, monkeypatch=monkeypatch)
    assert [r["round"] for r in _audit(tmp_path / "cut")] == [1, 2, 3]  # the interrupted run waited for them
    state = checkpoint.load(tmp_path / "cut").observers["audit"]
    assert state["rows"] == [] and [job.server_round for job in state["pending"]] == [1, 2]
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "cut", tmp_path / "alone")
    rows = _audit(tmp_path / "cut")
    assert [(r["round"], r["iterations"]) for r in rows] == [(r, 5) for r in range(1, 5)]
    assert rows == _audit(tmp_path / "alone")


def test_resume_on_the_ray_engine(tmp_path, monkeypatch, local_ray):
    """Against the run left alone on the inline engine: one seed gives one run on every engine
    (tests/test_engine_ray.py), and it spares a third start of the actors."""
    raw = small_raw(strategy={"name": "scaffold"}, train__rounds=4, train__participation=0.5)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    raw["engine"] = {"name": "ray", "ray": {"num_actors": 1}}
    _interrupted(raw, tmp_path / "cut", at=2, monkeypatch=monkeypatch)
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "alone")
    resumed, alone = _summary(tmp_path / "cut"), _summary(tmp_path / "alone")
    assert resumed.pop("engine") == "ray" and resumed["scenario"].pop("engine")["name"] == "ray"
    alone.pop("engine"), alone["scenario"].pop("engine")
    assert resumed == alone


def test_the_checkpoint_round_trips_arrays_and_accountants_exactly(tmp_path):
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    tensors = {"w": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(7), "n": torch.tensor(3)}
    accountant = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=10,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for _ in range(3):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=3, population_size=10))
    record, table = to_record(tensors), torch.randn(4, 9)
    back = pickle.loads(checkpoint.dumps({"record": record, "table": table, "acc": accountant, "same": accountant}))
    assert all(torch.equal(back_v, tensors[k]) and back_v.dtype == tensors[k].dtype
               for k, back_v in to_torch(back["record"]).items())
    assert torch.equal(back["table"], table) and back["acc"] is back["same"]  # shared objects stay shared
    assert back["acc"].get_privacy_spent().epsilon == accountant.get_privacy_spent().epsilon
    back["acc"].compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=3, population_size=10))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=3, population_size=10))
    assert back["acc"].get_privacy_spent().epsilon == accountant.get_privacy_spent().epsilon


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_run_dirs_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    assert resume_main([str(tmp_path / "missing")]) == 2
    assert "not a fedsim run" in _one_line(capsys)
    (tmp_path / "empty").mkdir()
    assert resume_main([str(tmp_path / "empty")]) == 2
    assert "not a fedsim run" in _one_line(capsys)

    raw = small_raw(train__rounds=3, output__checkpoint_every=0)
    _interrupted(raw, tmp_path / "none", at=2, monkeypatch=monkeypatch)
    capsys.readouterr()
    assert resume_main([str(tmp_path / "none")]) == 2
    assert "no checkpoint.pkl" in _one_line(capsys)
    with claim_output_dir(tmp_path / "none", resume=True):  # the run is still going (or another resume)
        assert resume_main([str(tmp_path / "none")]) == 2
    assert "in use by another run" in _one_line(capsys)

    raw = small_raw(train__rounds=3)
    _interrupted(raw, tmp_path / "torn", at=2, monkeypatch=monkeypatch)
    metrics = (tmp_path / "torn" / "metrics.jsonl").read_text()
    (tmp_path / "torn" / checkpoint.CHECKPOINT).write_bytes(b"\x80\x05garbage")
    capsys.readouterr()
    assert resume_main([str(tmp_path / "torn")]) == 2
    assert "unreadable checkpoint" in _one_line(capsys)
    assert (tmp_path / "torn" / "metrics.jsonl").read_text() == metrics  # a refused resume changes nothing

    run_scenario(parse_scenario(raw), tmp_path / "done", progress=False)
    capsys.readouterr()
    assert resume_main([str(tmp_path / "done")]) == 0  # documented: complete is not an error
    assert "already complete" in _one_line(capsys)

    proc = subprocess.run([sys.executable, "-m", "fedsim", "resume", str(tmp_path / "empty")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


class _Unpicklable(FedAvgStrategy):
    def __init__(self, settings):
        super().__init__(settings)
        self.hook = lambda: None  # pickle cannot take a lambda


register_strategy(StrategySpec("test_unpicklable", NoParams, lambda p, s: _Unpicklable(s), FedAvgClient))


def test_a_state_that_does_not_pickle_runs_on_without_checkpoints(tmp_path, capsys, monkeypatch):
    raw = small_raw(strategy={"name": "test_unpicklable"}, train__rounds=3)
    _interrupted(raw, tmp_path / "cut", at=2, monkeypatch=monkeypatch)
    assert "no checkpoints for this run" in _one_line(capsys)
    assert not (tmp_path / "cut" / checkpoint.CHECKPOINT).exists()


def test_resume_finishes_what_a_kill_after_the_summary_left_undone(tmp_path, capsys):
    """A kill between summary.json and the plot left a complete run without its plot and with a stale
    checkpoint: resume draws the plot from metrics.jsonl and removes the checkpoint (issue 21 item 10)."""
    raw = small_raw(train__rounds=2, output__plot=True)
    run_dir = tmp_path / "run"
    run_scenario(parse_scenario(raw), run_dir, progress=False)
    drawn = (run_dir / "accuracy.png").read_bytes()
    summary, metrics = (run_dir / "summary.json").read_text(), (run_dir / "metrics.jsonl").read_text()
    (run_dir / "accuracy.png").unlink()
    (run_dir / checkpoint.CHECKPOINT).write_bytes(b"stale")
    capsys.readouterr()
    assert resume_main([str(run_dir)]) == 0
    line = _one_line(capsys)
    assert "already complete" in line and "accuracy.png" in line and "stale" in line, line
    assert (run_dir / "accuracy.png").read_bytes()[:8] == drawn[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / checkpoint.CHECKPOINT).exists()
    assert (run_dir / "summary.json").read_text() == summary and (run_dir / "metrics.jsonl").read_text() == metrics
    capsys.readouterr()
    assert resume_main([str(run_dir)]) == 0
    assert "nothing to do" in _one_line(capsys)
