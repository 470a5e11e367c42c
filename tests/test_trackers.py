"""Trackers (``output.trackers``): what MLflow and TensorBoard stored, read back with their own readers
(MLflow's client API, TensorBoard's EventAccumulator); a missing package is one line, exit 2."""

import contextlib
import json
import os
from pathlib import Path

import pytest

import fedsim
from fedsim.cli import main
from fedsim.compare.sweep import _run_task, load_sweep
from fedsim.engines.inline import InlineGrid
from fedsim.run.outdir import OutputDirError, check_output_dir, claim_output_dir
from fedsim.run.resume import main as resume_main
from fedsim.run.results import read_metrics
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.trackers import TRACKERS, TrackerEntry, open_sweep
from tests.conftest import small_raw
from tests.test_resume import _AtCloseExecutor, _interrupted

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "scenarios" / "quickstart.yaml"


@pytest.fixture
def mlflow_client(monkeypatch):
    """A client of a run's own store, under its folder (``MLFLOW_TRACKING_URI`` unset)."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    return lambda folder: MlflowClient(f"sqlite:///{Path(folder).resolve() / 'mlflow' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def _shared_store(tmp_path_factory):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'shared.db'}"
    # The database made once (MLflow's schema: ~2 s). A store named by URI puts new experiments' artifacts in
    # ./mlruns of the working folder the store was made in: the temporary one, not the repository.
    with contextlib.chdir(folder):
        MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def shared_store(_shared_store, monkeypatch):
    """A client of one store for the module's tests, named by ``MLFLOW_TRACKING_URI`` (each test its own
    experiment, by scenario or sweep name)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _shared_store)
    monkeypatch.chdir(Path(_shared_store.removeprefix("sqlite:///")).parent)  # as the store was made (above)
    return MlflowClient(_shared_store)


def _events(log_dir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})  # 0: keep every event
    events.Reload()
    return events


def _only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value (the last logged at that step)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def test_the_quickstart_reports_every_round_to_mlflow_and_tensorboard(tmp_path, mlflow_client):
    pytest.importorskip("tensorboard")
    run = fedsim.run(QUICKSTART, {"train.rounds": 4, "output.trackers": ["mlflow", "tensorboard"],
                                  "output.progress": False}, out=tmp_path / "qs")
    accuracy = {r["round"]: r["accuracy"] for r in run.metrics}
    assert sorted(accuracy) == [1, 2, 3, 4]

    client = mlflow_client(tmp_path / "qs")
    stored = _only_run(client, "quickstart")
    assert stored.info.status == "FINISHED" and stored.info.run_name == "qs"
    assert _history(client, stored.info.run_id, "accuracy") == pytest.approx(accuracy)
    assert _history(client, stored.info.run_id, "bytes_up") == {r["round"]: r["bytes_up"] for r in run.metrics}
    loss = _history(client, stored.info.run_id, "train_metrics.train_loss")
    assert loss == pytest.approx({r["round"]: r["train_metrics"]["train_loss"] for r in run.metrics})
    params = stored.data.params
    assert (params["train.rounds"], params["strategy.name"], params["data.partition.alpha"]) == ("4", "fedavg", "0.5")
    assert json.loads(params["model.hidden"]) == [256]
    artifacts = {a.path for a in client.list_artifacts(stored.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "scenario.yaml", "report.html"} <= artifacts
    summary = json.loads(Path(client.download_artifacts(stored.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["accuracy"] == run.summary["accuracy"]

    events = _events(tmp_path / "qs" / "tensorboard")
    assert {e.step: e.value for e in events.Scalars("accuracy")} == pytest.approx(accuracy)  # float32 in events
    assert [e.step for e in events.Scalars("train_metrics/train_loss")] == [1, 2, 3, 4]

    # The folder's store is replaced with the rest of the run (in this process too, as in a notebook).
    again = fedsim.run(QUICKSTART, {"train.rounds": 1, "output.trackers": ["mlflow"], "output.progress": False},
                       out=tmp_path / "qs", overwrite=True)
    stored = _only_run(mlflow_client(tmp_path / "qs"), "quickstart")
    assert _history(client, stored.info.run_id, "accuracy") == pytest.approx({1: again.metrics[0]["accuracy"]})
    assert not (tmp_path / "qs" / "tensorboard").exists()


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_log_with_the_audit(tmp_path, monkeypatch,
                                                                                    shared_store):
    pytest.importorskip("tensorboard")
    # The attacks run in this process when the run waits for them (tests/test_resume.py's executor).
    monkeypatch.setattr(InlineGrid, "audit_executor", lambda self: _AtCloseExecutor(), raising=False)
    raw = small_raw(name="resumed", train__rounds=4,
                    audit={"attack": "ig", "threat": "gradient", "batch_size": 2, "clients": 1,
                                            "every": 2, "attack_config": {"iterations": 5}},
                    output={"plot": False, "progress": False, "trackers": ["mlflow", "tensorboard"]})
    out = tmp_path / "cut"
    _interrupted(raw, out, at=3, monkeypatch=monkeypatch)  # round 3's row is logged, its checkpoint not written
    client = shared_store
    killed = _only_run(client, "resumed")
    assert killed.info.status == "KILLED"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a resumed run reports to the store its run is in, whatever is set now
    assert resume_main([str(out), "--quiet"]) == 0

    resumed = _only_run(client, "resumed")  # the same MLflow run, finished
    assert not (out / "mlflow").exists()
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    rows = read_metrics(out)
    assert _history(client, resumed.info.run_id, "accuracy") == pytest.approx({r["round"]: r["accuracy"] for r in rows})
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in audit}) == [2, 4]
    psnr = _history(client, resumed.info.run_id, "audit.psnr")
    assert psnr == pytest.approx({r["round"]: r["psnr"] for r in audit})
    artifacts = {a.path for a in client.list_artifacts(resumed.info.run_id, "audit") if a.path.endswith(".png")}
    assert artifacts == {f"audit/round-{r['round']}-client-{r['client']}.png" for r in audit}  # reconstructions

    events = _events(out / "tensorboard")
    assert [e.step for e in events.Scalars("accuracy")] == [1, 2, 3, 4]  # round 3, redone, once
    assert [e.value for e in events.Scalars("accuracy")] == pytest.approx([r["accuracy"] for r in rows])
    assert [e.step for e in events.Scalars("audit/psnr")] == [2, 4]
    images = {(i.step, tag): i for tag in events.Tags()["images"] for i in events.Images(tag)}
    assert sorted(images) == sorted((r["round"], f"audit/client-{r['client']}") for r in audit)
    assert all(i.width > 100 and i.height > 50 for i in images.values())  # each reconstruction grid


def test_a_sweep_is_one_parent_mlflow_run_with_a_child_run_per_scenario(tmp_path, shared_store):
    (tmp_path / "base.yaml").write_text(json.dumps(small_raw(
        train__rounds=2, output={"plot": False, "progress": False, "trackers": ["mlflow"]})))
    (tmp_path / "lrs.yaml").write_text(json.dumps({"name": "lrs", "base": "base.yaml", "grid": {"train.lr": [0.05, 0.2]}}))
    spec, runs = load_sweep(tmp_path / "lrs.yaml")
    root = tmp_path / "sweeps" / "lrs"
    first = open_sweep(spec.name, root, [r.scenario for r in runs])
    for r in runs:  # each run as the sweep's Ray task runs it (tests/test_sweep.py runs sweeps on Ray)
        _run_task(r.scenario.to_yaml(), str(root / "runs" / r.name), first)
    # The sweep run again through the API: every run is done (no Ray starts), so it reopens the same parent run,
    # writes runs.csv and the report, and closes the parent with them.
    result = fedsim.sweep(tmp_path / "lrs.yaml", out=tmp_path / "sweeps")
    assert result.dir == root and sorted(result.runs) == sorted(r.name for r in runs)
    assert [row["train.lr"] for row in result.rows] == [0.05, 0.2]

    client = shared_store  # MLFLOW_TRACKING_URI's store, not one under the sweep's folder
    assert not (root / "mlflow").exists()
    stored = client.search_runs([client.get_experiment_by_name("lrs").experiment_id])
    (parent,) = [s for s in stored if "mlflow.parentRunId" not in s.data.tags]
    assert parent.info.run_id == first["mlflow"]["parent_run_id"]
    children = {s.info.run_name: s for s in stored if s.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.info.run_name == "lrs"
    assert sorted(children) == sorted(r.name for r in runs) and len(stored) == 3
    for r in runs:
        child = children[r.name]
        assert child.data.params["train.lr"] == str(r.values["train.lr"])
        assert _history(client, child.info.run_id, "accuracy") == pytest.approx(
            {row["round"]: row["accuracy"] for row in result.runs[r.name].metrics})
    assert {"runs.csv", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not (root / "runs" / runs[0].name / "mlflow").exists()  # the children live in the sweep's store


def test_a_tracker_without_its_package_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch,
                                                                                       capsys):
    # The registry's real check, on a package that is not installed anywhere.
    monkeypatch.setitem(TRACKERS, "mlflow", TrackerEntry("fedsim.trackers.mlflow", "MLflowTracker",
                                                         "fedsim_no_such_package", "mlflow"))
    out = tmp_path / "out"
    assert main([str(QUICKSTART), "--set", "output.trackers=[mlflow]", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fedsim: error: output.trackers: mlflow needs the fedsim_no_such_package package, which is not "
                   "installed: pip install 'fedsim[mlflow]'")
    assert not out.exists()
    with pytest.raises(ScenarioError, match=r"pip install 'fedsim\[mlflow\]'"):
        fedsim.run(QUICKSTART, {"output.trackers": ["mlflow"]}, out=out)
    assert not out.exists()


@pytest.mark.parametrize("trackers, message", [
    (["wandb"], "output.trackers: unknown tracker 'wandb'; allowed: mlflow, tensorboard"),
    (["mlflow", "mlflow"], "output.trackers: a tracker is listed twice (mlflow, mlflow)"),
    ("mlflow", "output.trackers: Input should be a valid list"),
])
def test_unknown_or_repeated_trackers_are_refused_naming_the_key(trackers, message):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(small_raw(output={"trackers": trackers}))
    assert str(err.value).startswith(message)


def test_a_run_folder_holding_tracker_stores_is_overwritten_but_a_link_inside_one_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "mlflow" / "artifacts" / "1" / "abc" / "artifacts" / "audit").mkdir(parents=True)
    (run / "mlflow" / "mlflow.db").write_bytes(b"SQLite format 3\0")
    (run / "mlflow" / "artifacts" / "1" / "abc" / "artifacts" / "audit" / "round-1-client-0.png").write_bytes(b"x")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1796624395.host.123.0").write_bytes(b"x")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(OutputDirError, match="--overwrite"):
        check_output_dir(run)
    with claim_output_dir(run, overwrite=True):
        assert sorted(p.name for p in run.iterdir()) == [".fedsim.lock"]

    (run / "mlflow").mkdir()
    (run / "mlflow" / "mlflow.db").write_bytes(b"")
    os.symlink(tmp_path, run / "mlflow" / "artifacts")  # removing the store must never reach outside it
    with pytest.raises(OutputDirError, match="holds files fedsim did not write"):
        check_output_dir(run, overwrite=True)
    (run / "mlflow" / "artifacts").unlink()
    (run / "mlflow" / "notes.txt").write_text("mine")  # not a name MLflow's store has
    with pytest.raises(OutputDirError, match="holds files fedsim did not write"):
        check_output_dir(run, overwrite=True)
