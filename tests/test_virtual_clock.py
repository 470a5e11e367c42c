"""The virtual clock (docs/time.md): device round trips are the arithmetic of bytes, bandwidth, latency
and steps; a deadline drops stragglers as failures before aggregation; the clock survives resume; the
system model is seeded and ``correlate: label`` hands the slowest devices to the chosen classes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.run import apps, checkpoint
from fedsim.run.clock import STRAGGLER
from fedsim.run.observers import ProgressObserver
from fedsim.run.resume import main as resume_main
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from fedsim.scenario.schema import ScenarioError, SystemConfig
from fedsim.world.system import Device, SystemModel
from strategies.records import to_torch
from tests.conftest import small_raw

# Two hand-made devices: A computes slowly on a fast link, B quickly on a slow uplink.
A = Device(step_s=0.5, latency_s=0.1, down_mbps=8.0, up_mbps=4.0)
B = Device(step_s=0.25, latency_s=0.2, down_mbps=16.0, up_mbps=2.0)
STEPS = 2  # local_epochs 2 of one batch each (batch_size above every client's sample count)


def _trace(tmp_path: Path) -> str:
    path = tmp_path / "devices.csv"
    path.write_text("device,step_s,latency_s,down_mbps,up_mbps\n"
                    + "".join(f"{name},{d.step_s},{d.latency_s},{d.down_mbps},{d.up_mbps}\n"
                              for name, d in (("a", A), ("b", B))))
    return str(path)


def _two_clients(tmp_path: Path, **overrides) -> dict:
    return small_raw(data__num_clients=2, train__local_epochs=STEPS, train__batch_size=10_000,
                     system={"trace": _trace(tmp_path)}, **overrides)


def _trip(device: Device, bytes_down: int, bytes_up: int) -> float:
    """The round trip by hand: download, local steps, upload."""
    return (device.latency_s + bytes_down * 8 / (device.down_mbps * 1e6) + device.step_s * STEPS
            + device.latency_s + bytes_up * 8 / (device.up_mbps * 1e6))


def _recording(monkeypatch) -> list:
    """The RoundRecords the run's progress observer sees (the records every observer saw)."""
    seen = []

    class Recording(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            seen.append(record)

    monkeypatch.setattr(apps, "ProgressObserver", Recording)
    return seen


def test_a_device_round_trip_is_download_work_upload():
    assert A.round_trip_s(1_000_000, 3, 500_000) == pytest.approx((0.1 + 1.0) + 1.5 + (0.1 + 1.0), rel=1e-15)


def test_two_client_rounds_last_as_long_as_the_arithmetic_says(tmp_path):
    run_scenario(parse_scenario(_two_clients(tmp_path, output__plot=True)), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "accuracy_time.png").is_file()
    rows = read_metrics(tmp_path / "run")
    for row in rows:  # dense FedAvg: both were sent the same arrays and sent back as many bytes
        down, up = row["bytes_down"] // 2, row["bytes_up"] // 2
        assert row["train_metrics"]["local_steps"] == STEPS
        assert row["virtual_s"] == pytest.approx(max(_trip(A, down, up), _trip(B, down, up)), rel=1e-12)
        assert row["stragglers"] == 0 and row["failures"] == 0
    assert rows[1]["virtual_time_s"] == pytest.approx(rows[0]["virtual_s"] + rows[1]["virtual_s"], rel=1e-12)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["virtual_time_s"] == rows[-1]["virtual_time_s"]


def test_a_deadline_drops_the_straggler_before_aggregation(tmp_path, monkeypatch):
    bytes_round = parse_scenario(_two_clients(tmp_path))  # the trips without a deadline, to place it between
    run_scenario(bytes_round, tmp_path / "free", progress=False)
    row = read_metrics(tmp_path / "free")[0]
    fast, slow = sorted(_trip(d, row["bytes_down"] // 2, row["bytes_up"] // 2) for d in (A, B))
    deadline = (fast + slow) / 2
    seen = _recording(monkeypatch)
    run_scenario(parse_scenario(_two_clients(tmp_path, train__deadline_s=deadline, train__rounds=1)),
                 tmp_path / "cut", progress=False)
    row = read_metrics(tmp_path / "cut")[0]
    assert (row["virtual_s"], row["stragglers"], row["failures"], row["participants"]) == (deadline, 1, 1, 1)
    assert list(row["failure_reasons"].values()) == [STRAGGLER]
    record = seen[0]
    kept = record.replies[0]
    assert kept.virtual_s == pytest.approx(fast) and record.failures[0].virtual_s == pytest.approx(slow)
    # FedAvg of the one reply in time is that client's model: the straggler's update did not count
    new, alone = to_torch(record.arrays), to_torch(kept.reply["arrays"])
    assert all(torch.allclose(new[k], alone[k], atol=1e-6) for k in new)
    assert any(not torch.equal(new[k], to_torch(record.arrays_sent)[k]) for k in new)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stragglers_total"] == 1 and summary["failure_reasons"] == {STRAGGLER: 1}


def test_the_clock_and_a_stragglers_own_state_survive_resume(tmp_path, monkeypatch):
    """SCAFFOLD with one straggler a round: the straggler's control variate is kept (it trained, as a
    real device does), and an interrupted run resumes to the same virtual times."""
    raw = _two_clients(tmp_path, strategy={"name": "scaffold"}, train__rounds=3, train__deadline_s=1.1)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    alone = read_metrics(tmp_path / "alone")
    assert [r["stragglers"] for r in alone] == [1, 1, 1]

    class CtrlC(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            if record.server_round == 3:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(apps, "ProgressObserver", CtrlC)
        with pytest.raises(KeyboardInterrupt):
            run_scenario(parse_scenario(raw), tmp_path / "cut", progress=False)
    ckpt = checkpoint.load(tmp_path / "cut")
    assert ckpt.server_round == 2 and ckpt.observers["clock"] == (pytest.approx(2 * 1.1), 2)
    assert len(ckpt.node_states) == 2  # the straggler's c_i too
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    wall = ("wall_s", "elapsed_s")
    assert ([{k: v for k, v in r.items() if k not in wall} for r in read_metrics(tmp_path / "cut")]
            == [{k: v for k, v in r.items() if k not in wall} for r in alone])


def _system(**kw) -> SystemConfig:
    return SystemConfig(step_s={"dist": "uniform", "low": 0.01, "high": 1.0},
                        up_mbps={"dist": "lognormal", "median": 5, "sigma": 1.0}, **kw)


def test_the_system_model_is_seeded_and_correlates_slow_devices_with_classes():
    one, again, other = (SystemModel.build(_system(), 6, seed) for seed in (0, 0, 1))
    assert one == again and one != other
    assert len({d.step_s for d in one.devices}) == 6 and {d.latency_s for d in one.devices} == {0.05}
    counts = np.array([[9, 1, 0], [0, 1, 9], [5, 0, 5], [1, 0, 9], [9, 0, 1], [3, 0, 7]])  # class 2's share
    by_labels = SystemModel.build(_system(correlate="label", slow_classes=[2]), 6, 0, counts)
    assert sorted(by_labels.devices, key=lambda d: d.step_s) == sorted(one.devices, key=lambda d: d.step_s)
    share_order = [1, 3, 5, 2, 4, 0]  # 0.9, 0.9, 0.7, 0.5, 0.1, 0.1 (ties: the lower id first)
    assert [by_labels[i].step_s for i in share_order] == sorted((d.step_s for d in one.devices), reverse=True)


@pytest.mark.parametrize("overrides, line", [
    (dict(train__deadline_s=1.0), "train.deadline_s: needs a system section"),
    (dict(system={"step_s": {"dist": "uniform", "low": 2, "high": 1}}), "system.step_s: Value error, uniform needs low <= high"),
    (dict(system={"step_s": {"dist": "gamma"}}), "system.step_s.dist: Input should be"),
    (dict(system={"correlate": "label"}), "system: Value error, correlate: label needs slow_classes"),
    (dict(system={"correlate": "label", "slow_classes": [10]}), "system.slow_classes: class 10 does not exist"),
    (dict(system={}, train__deadline_s=1.0, upload={"codec": "ef21"}), "train.deadline_s: ef21 keeps each client's"),
    (dict(system={"latency": 1}), "system.latency: unknown key; allowed: step_s"),
    (dict(system={}, train__deadline_s=1.0, defense={"name": "dp_user"}), "train.deadline_s: dp_user's accountant"),
])
def test_bad_system_settings_are_one_line_naming_the_key(overrides, line):
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(small_raw(**overrides))
    assert str(exc.value).startswith(line)


def test_a_trace_without_a_column_is_bad_input(tmp_path, capsys):
    (tmp_path / "devices.csv").write_text("step_s,latency_s,down_mbps\n0.1,0.1,10\n")
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(small_raw(system={"trace": str(tmp_path / "devices.csv")})))
    assert main([str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsim: error: system.trace:") and "up_mbps" in err and "\n" not in err
