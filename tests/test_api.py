"""The Python API (fedsim.api): ``fedsim.run``, ``fedsim.load_scenario``, ``Run``; the example of docs/api.md
runs as it is written there."""

import re
import shutil
import sys
from pathlib import Path

import pytest

import fedsim
from fedsim.run.outdir import OutputDirError
from fedsim.scenario import ScenarioError, load_scenario as load_with_set
from tests.conftest import small_raw

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "scenarios" / "quickstart.yaml"


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pandas")
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), flags=re.S)
    (tmp_path / "experiments" / "scenarios").mkdir(parents=True)
    shutil.copy(QUICKSTART, tmp_path / "experiments" / "scenarios")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/api.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    run = fedsim.Run.load(tmp_path / "runs" / "quickstart-5")
    assert f"accuracy after 5 rounds: {run.summary['accuracy']:.3f}" in out
    assert [r["round"] for r in run.metrics] == [1, 2, 3, 4, 5]
    assert fedsim.Run.load(tmp_path / "runs" / "quickstart-5-fedprox").summary["scenario"]["strategy"]["name"] == "fedprox"


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (tmp_path / "experiments" / "scenarios").mkdir(parents=True)
    shutil.copy(QUICKSTART, tmp_path / "experiments" / "scenarios")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__main__"})
    run = fedsim.Run.load(tmp_path / "runs" / "qs5")
    accuracy, bytes_up = capsys.readouterr().out.split()
    assert float(accuracy) == run.summary["accuracy"] and int(bytes_up) == run.metrics[-1]["bytes_up"]
    assert len(run.metrics) == 5


def test_fedsim_run_is_the_function_and_still_the_package():
    from fedsim.run.apps import run_server  # the package's modules import as before

    assert callable(fedsim.run) and fedsim.run is sys.modules["fedsim.run"]
    assert callable(run_server)
    assert fedsim.load_scenario is fedsim.api.load_scenario and fedsim.sweep is fedsim.api.sweep


def test_a_run_returns_its_metrics_summary_and_folder_and_a_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    run = fedsim.run(small_raw(train__rounds=2), out=tmp_path / "run")
    assert run.dir == tmp_path / "run" and run.audit == []
    assert [r["round"] for r in run.metrics] == [1, 2] and run.summary["rounds"] == 2
    frame = run.dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame["accuracy"]) == [r["accuracy"] for r in run.metrics]
    assert "train_metrics.train_loss" in frame.columns
    with pytest.raises(OutputDirError, match="overwrite"):  # as on the command line: a used folder is refused
        fedsim.run(small_raw(train__rounds=1), out=tmp_path / "run")
    assert fedsim.run(small_raw(train__rounds=1), out=tmp_path / "run", overwrite=True).summary["rounds"] == 1


def test_overrides_are_the_dotted_keys_of_set_with_python_values():
    overrides = {"train.rounds": 3, "defense": {"name": "noise", "variance": 0.01}, "data.partition.name": "iid"}
    scenario = fedsim.load_scenario(QUICKSTART, overrides)
    assert scenario == load_with_set(QUICKSTART, ["train.rounds=3", "defense={name: noise, variance: 0.01}",
                                                  "data.partition.name=iid"])
    assert fedsim.load_scenario(scenario) == scenario  # a Scenario goes in as it is
    assert fedsim.load_scenario(scenario, {"seed": 5}).seed == 5 and scenario.seed == 0


def test_bad_input_raises_and_writes_nothing(tmp_path):
    with pytest.raises(ScenarioError, match=r"^train\.rounds: "):
        fedsim.run(QUICKSTART, {"train.rounds": 0}, out=tmp_path / "x")
    with pytest.raises(ScenarioError, match="scenario file not found"):
        fedsim.run(tmp_path / "missing.yaml", out=tmp_path / "x")
    with pytest.raises(TypeError, match="overrides"):
        fedsim.load_scenario(QUICKSTART, ["train.rounds=2"])
    assert not (tmp_path / "x").exists()
