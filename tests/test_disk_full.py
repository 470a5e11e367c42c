"""A full disk (ENOSPC; EDQUOT alike) anywhere in a run or a report is one line naming the file and
exit 1, with every file as it was before the failed write, and ``fedsim resume`` (space freed) ends
with the metrics of the run left alone. ``fedsim deploy`` checks its scenario before `flwr` runs;
its usage and connection errors are one line, exit 2."""

import errno
import json
import os
import subprocess
from pathlib import Path

import matplotlib.figure
import pytest
import yaml

from fedsim.cli import main as fedsim_main
from fedsim.deploy import follow
from fedsim.deploy.cluster import free_port
from fedsim.engines import run_scenario
from fedsim.run import checkpoint, results
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from tests.conftest import small_raw
from tests.test_resume import _metrics, _summary  # metrics and summary without wall times



def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class _FullFile:
    """A file whose write fails as on a full disk, after writing ``keep`` bytes of what it was given."""

    def __init__(self, fh, keep: int = 0, code: int = errno.ENOSPC):
        self.fh, self.keep, self.code = fh, keep, code

    def write(self, data):
        self.fh.write(data[: self.keep])
        self.fh.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _full_after(monkeypatch, marker: str, after: int = 0, keep: int = 0, code: int = errno.ENOSPC) -> None:
    """Every file descriptor opened with os.fdopen (the atomic writes' temporary files) whose path holds
    ``marker`` writes normally ``after`` times, then hits a full disk."""
    real, seen = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        fh = real(fd, *args, **kwargs)
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) > after:
                return _FullFile(fh, keep, code)
        return fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def _write_scenario(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _resume_equals_alone(out: Path, alone: Path, capsys) -> None:
    assert fedsim_main(["resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert _metrics(out) == _metrics(alone)
    assert _summary(out) == _summary(alone)
    assert not (out / checkpoint.CHECKPOINT).exists()
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.png"))


@pytest.fixture
def alone(tmp_path):
    raw = small_raw(train__rounds=4, output__plot=True)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    return raw, tmp_path / "alone"


def test_full_disk_on_the_metrics_append_is_one_line_and_resumes_exactly(tmp_path, monkeypatch, capsys, alone):
    raw, alone_dir = alone
    out = tmp_path / "full"
    real_open, appends = open, []

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            if len(appends) == 3:  # round 3: half its line is written, then the disk is full
                return _FullFile(fh, keep=20)
        return fh

    with monkeypatch.context() as m:
        m.setattr(results, "open", fake_open, raising=False)
        code = fedsim_main([str(_write_scenario(tmp_path, raw)), "--out", str(out), "--quiet"])
    line = _one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith(f"fedsim: error: no space left on the device writing {out / 'metrics.jsonl'}; ")
    assert "fedsim resume" in line
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [r["round"] for r in read_metrics(out)] == [1, 2]  # no torn line
    assert [json.loads(t) for t in text.splitlines()] == read_metrics(out)
    assert not (out / "summary.json").exists() and not list(out.glob(".*.tmp"))
    _resume_equals_alone(out, alone_dir, capsys)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EDQUOT, "the disk quota is used up")])
def test_full_disk_on_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys, alone, code, words):
    raw, alone_dir = alone
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        _full_after(m, f".{checkpoint.CHECKPOINT}.", after=2, keep=100, code=code)  # round 3's checkpoint
        exit_code = fedsim_main([str(_write_scenario(tmp_path, raw)), "--out", str(out), "--quiet"])
    line = _one_line(capsys.readouterr().err)
    assert exit_code == 1
    assert line.startswith(f"fedsim: error: {words} writing {out / checkpoint.CHECKPOINT}; "), line
    assert checkpoint.load(out).server_round == 2  # round 2's, intact
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]
    assert not list(out.glob(".*.tmp"))
    _resume_equals_alone(out, alone_dir, capsys)


def test_full_disk_on_the_summary_and_on_the_plot(tmp_path, monkeypatch, capsys, alone):
    raw, alone_dir = alone
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        _full_after(m, ".summary.json.")
        assert fedsim_main([str(_write_scenario(tmp_path, raw)), "--out", str(out), "--quiet"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"no space left on the device writing {out / 'summary.json'}; " in line
    assert not (out / "summary.json").exists() and not list(out.glob(".*.tmp"))
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3, 4]

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # resume: the summary goes, the plot does not
        m.setattr(matplotlib.figure.Figure, "savefig", savefig)
        assert fedsim_main(["resume", str(out), "--quiet"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"no space left on the device writing {out / 'accuracy.png'}; " in line
    assert not (out / "accuracy.png").exists() and not list(out.glob(".*.png"))

    # report: a PNG of the report on a full disk
    alone_report = alone_dir
    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", savefig)
        assert fedsim_main(["report", str(alone_report)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fedsim: error: no space left on the device writing ") and ".png" in line
    assert not (alone_report / "report.html").exists()
    assert not [p for p in alone_report.rglob(".*") if p.suffix in (".tmp", ".png")]


def test_full_disk_on_the_report_page(tmp_path, monkeypatch, capsys, alone):
    _, alone_dir = alone
    with monkeypatch.context() as m:
        _full_after(m, ".report.html.")
        assert fedsim_main(["report", str(alone_dir)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"fedsim: error: no space left on the device writing {alone_dir / 'report.html'}; ")
    assert not (alone_dir / "report.html").exists() and not list(alone_dir.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------- deploy

@pytest.fixture
def no_flwr(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"flwr was started: {args}")

    monkeypatch.setattr(follow.subprocess, "run", refuse)
    monkeypatch.setattr(follow.subprocess, "Popen", refuse)


@pytest.mark.parametrize("raw", [small_raw(train__rounds=0), small_raw(strategy={"name": "nosuch"}),
                                 small_raw(data__num_clients="four")])
def test_deploy_refuses_a_bad_scenario_before_flwr(tmp_path, capsys, no_flwr, raw):
    assert fedsim_main(["deploy", str(_write_scenario(tmp_path, raw))]) == 2
    assert _one_line(capsys.readouterr().err).startswith("fedsim: error: ")


@pytest.mark.parametrize("argv", [[], ["--timeout", "abc", "S"], ["S", "--nosuch"], ["S", "--timeout", "-1"],
                                  ["S", "--timeout", "nan"], ["no/such/scenario.yaml"]])
def test_deploy_bad_usage_is_one_line(tmp_path, capsys, no_flwr, argv):
    argv = [str(_write_scenario(tmp_path, small_raw())) if a == "S" else a for a in argv]
    try:
        code = fedsim_main(["deploy", *argv])
    except SystemExit as exc:  # the argument parser's own refusal
        code = exc.code
    assert code == 2
    assert _one_line(capsys.readouterr().err).startswith("fedsim: error: ")


def test_deploy_to_an_unreachable_superlink_is_one_line(tmp_path, monkeypatch, capsys):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "nowhere"\n[superlink.nowhere]\n'
                                      f'address = "127.0.0.1:{free_port()}"\ninsecure = true\n')
    monkeypatch.setenv("FLWR_HOME", str(home))
    started = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        started.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(follow.subprocess, "run", run)
    path = _write_scenario(tmp_path, small_raw())
    assert fedsim_main(["deploy", str(path), "--timeout", "60", "--app", str(Path(__file__).resolve().parents[1])]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fedsim deploy: error: the run was not submitted: ") and "SuperLink" in line, line
    assert len(started) == 1  # only `flwr run`: no log streamer
