"""Output folders (fedsim.run.outdir): checked before any work, one run at a time, no mixing of two
runs' results, and nothing written where the output cannot go."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from fedsim.run.outdir import LOCK_NAME, OutputDirError, claim_output_dir
from tests.conftest import small_raw

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


def _scenario(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(**{"train__rounds": 1, **overrides})))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedsim: error:"), err
    return err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*"))}


def test_a_run_owns_a_fresh_folder_and_leaves_no_lock_behind(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "scenario.yaml", "summary.json"]


def test_a_used_folder_is_refused_without_overwrite_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert str(out) in err and "holds the results of another run" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_overwrite_clears_the_old_run_first(tmp_path, capsys):
    """No summary, plot or reconstruction of the old run survives beside the new metrics."""
    out = tmp_path / "run"
    assert main([str(_scenario(tmp_path, output__plot=True)), "--out", str(out), "--quiet"]) == 0
    assert (out / "accuracy.png").is_file()
    (out / "audit").mkdir()
    (out / "audit" / "round-1-client-0.png").write_bytes(b"old")
    (out / "audit.jsonl").write_text("{}\n")
    (out / ".summary.json.abc_1234.tmp").write_text("torn")  # a killed run's temporary files
    (out / ".accuracy.png.k3j9x0qa.png").write_bytes(b"torn plot")
    (out / "audit" / ".round-1-client-0.png.zz00aa11.png").write_bytes(b"torn")
    (out / "checkpoint.pkl").write_bytes(b"state")  # output.checkpoint_every, and its torn write
    (out / ".checkpoint.pkl.q1w2e3r4.tmp").write_bytes(b"torn state")
    (out / "audit_psnr.png").write_bytes(b"old")
    assert main([str(_scenario(tmp_path, train__rounds=2)), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "scenario.yaml", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_overwrite_never_deletes_files_fedsim_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "audit").mkdir()
    (out / "audit" / "thesis.tex").write_text("mine too")  # in a folder fedsim fills, but not fedsim's
    before = _snapshot(out)
    capsys.readouterr()
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet", "--overwrite"]) == 2
    err = _one_error_line(capsys)
    assert "files fedsim did not write" in err and "notes.txt" in err and "audit" in err
    assert _snapshot(out) == before


# What a user keeps in a run's folder that only looks like fedsim's (issue 21, item 1): each survives
# a run with --overwrite and a sweep's redo of an unfinished run, and is not called a run's results.
USER_FILES = {
    "checkpoints/epoch1/model.bin": "a checkpoints folder",
    "checkpoint_best.pt": "a checkpoint file",
    ".notes.tmp/todo.txt": "a hidden folder ending in .tmp",
    ".cover.png": "a hidden PNG",
    ".summary.json.tmp": "a hidden file named like a temporary file, but not one fedsim makes",
}


def _user_file(out: Path, rel: str) -> Path:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("mine")
    return path


@pytest.mark.parametrize("rel", USER_FILES)
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_users_file_like_fedsims_is_never_deleted(tmp_path, capsys, rel, overwrite):
    out = tmp_path / "run"
    assert main([str(_scenario(tmp_path, output__plot=True)), "--out", str(out), "--quiet"]) == 0
    mine = _user_file(out, rel)
    before = _snapshot(out)
    capsys.readouterr()
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"] + ["--overwrite"] * overwrite) == 2
    err = _one_error_line(capsys)
    assert "files fedsim did not write" in err and rel.split("/")[0] in err, err
    assert "results of another run" not in err
    assert mine.read_text() == "mine" and _snapshot(out) == before


@pytest.mark.parametrize("rel", USER_FILES)
def test_a_folder_of_only_user_files_is_refused_not_called_a_run(tmp_path, capsys, rel):
    out = tmp_path / "run"
    mine = _user_file(out, rel)
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet", "--overwrite"]) == 2
    err = _one_error_line(capsys)
    assert "files fedsim did not write" in err and "results of another run" not in err, err
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("rel", USER_FILES)
def test_a_sweeps_redo_of_an_unfinished_run_keeps_a_users_file(tmp_path, capsys, rel):
    from fedsim.compare.sweep import _run_task, load_sweep
    from fedsim.scenario import parse_scenario

    run_dir = tmp_path / "runs" / "r"  # the task itself (run_sweep checks first: below)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.1}\n{"round": 2, "acc')  # killed mid-run
    (run_dir / "checkpoint.pkl").write_bytes(b"state")
    mine = _user_file(run_dir, rel)
    with pytest.raises(OutputDirError, match="files fedsim did not write"):
        _run_task(parse_scenario(small_raw(train__rounds=1)).to_yaml(), str(run_dir))
    assert mine.read_text() == "mine" and (run_dir / "checkpoint.pkl").read_bytes() == b"state"

    _, runs = load_sweep(_sweep(tmp_path))
    sweep_run = tmp_path / "out" / "tiny" / "runs" / runs[0].name
    sweep_run.mkdir(parents=True)
    (sweep_run / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.1}\n')  # unfinished: no summary
    mine = _user_file(sweep_run, rel)
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert f"sweep run {runs[0].name}: output folder" in err and "files fedsim did not write" in err, err
    assert mine.read_text() == "mine"


def test_clear_removes_only_fedsims_own_files_even_if_called_alone(tmp_path):
    """The removal re-checks each name: a user file never goes, whatever the caller checked."""
    from fedsim.run.outdir import _clear

    out = tmp_path / "run"
    out.mkdir()
    own = ["summary.json", "metrics.jsonl", "checkpoint.pkl", ".checkpoint.pkl.abcdefgh.tmp", "audit/round-2-client-3.png",
           "audit/.round-2-client-3.png.a1b2c3d4.png", ".accuracy.png.a_b_c_d_.png", "report/accuracy.png"]
    for rel in own:
        _user_file(out, rel)
    mine = [_user_file(out, rel) for rel in [*USER_FILES, "audit/notes.txt", "report/thesis.pdf"]]
    _clear(out)
    assert all(p.read_text() == "mine" for p in mine)
    assert not any((out / rel).exists() for rel in own)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", "x" * 256])
def test_a_scenario_name_must_be_one_safe_folder_name(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    path = _scenario(tmp_path, name=name)
    assert main([str(path)]) == 2
    assert _one_error_line(capsys).startswith("fedsim: error: name: ")
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]  # nothing in the working folder or beside it


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a_file").write_text("x")
    return {
        "a file": (tmp_path / "a_file", "is a file, not a folder"),
        "under a file": (tmp_path / "a_file" / "run", "is a file, not a folder"),
        "name too long": (tmp_path / ("n" * 300), "this file system allows"),
        "path too long": (tmp_path.joinpath(*["p" * 200] * 25), "this file system allows"),
        # /sys takes no new folders, even from root (for whom every mode bit is writable)
        "unwritable": (Path("/sys/fedsim-test-unwritable/run"), "cannot"),
    }


@pytest.mark.parametrize("via", ["--out", "output.dir"])
@pytest.mark.parametrize("case", ["a file", "under a file", "name too long", "path too long", "unwritable"])
def test_an_unusable_output_path_is_one_line_before_any_work(tmp_path, capsys, case, via):
    out, needle = _bad_paths(tmp_path)[case]
    before = sorted(os.listdir(tmp_path))
    if via == "--out":
        argv = [str(_scenario(tmp_path)), "--out", str(out)]
    else:
        argv = [str(_scenario(tmp_path, output__dir=str(out)))]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert "output folder" in err and needle in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(set(before) | {"s.yaml"})
    assert not Path("/sys/fedsim-test-unwritable").exists()


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_refused_in_validation(tmp_path, capsys, value):
    assert main(["validate", str(_scenario(tmp_path, output__dir=value))]) == 2
    assert "output.dir: must be a folder path" in _one_error_line(capsys)


def test_two_runs_on_one_folder_at_once(tmp_path, capsys):
    """The first (a real run in its own process) holds the folder; the second is refused with
    one line and writes nothing there; the first completes with its results intact."""
    out = tmp_path / "run"
    rounds = 100  # ~60 ms a round: the first run is still training when the second starts
    first = subprocess.Popen([sys.executable, "-m", "fedsim", str(_scenario(tmp_path, train__rounds=rounds)),
                              "--out", str(out), "--quiet"], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.05)
        assert (out / LOCK_NAME).is_file()
        assert main([str(_scenario(tmp_path, train__rounds=2)), "--out", str(out), "--quiet", "--overwrite"]) == 2
        err = _one_error_line(capsys)
        assert f"{out} is in use by another run (pid {first.pid})" in err, err
        assert first.poll() is None  # the refusal came while the first run was still running
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == rounds and [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert summary["scenario"]["train"]["rounds"] == rounds
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "scenario.yaml", "summary.json"]


def test_claim_is_exclusive_and_resume_keeps_the_run(tmp_path):
    out = tmp_path / "run"
    with claim_output_dir(out) as held:
        assert held == out and (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputDirError, match="in use by another run"):
            with claim_output_dir(out):
                pass
        (out / "scenario.yaml").write_text("name: x\n")
        (out / "metrics.jsonl").write_text('{"round": 1}\n')
        (out / "checkpoint.pkl").write_bytes(b"state")
    assert not (out / LOCK_NAME).exists()
    before = _snapshot(out)
    with claim_output_dir(out, resume=True):
        with pytest.raises(OutputDirError, match="in use"):
            with claim_output_dir(out, overwrite=True):
                pass
    assert _snapshot(out) == before  # resume keeps the run as it is
    with pytest.raises(OutputDirError, match="holds no run to resume"):
        with claim_output_dir(tmp_path / "nothing", resume=True):
            pass
    assert not (tmp_path / "nothing").exists()  # a refused claim leaves no folder behind
    with pytest.raises(OutputDirError, match="holds the results of another run"):
        with claim_output_dir(out):
            pass
    with claim_output_dir(out, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_folder_the_run_wrote_nothing_into_is_removed_again(tmp_path):
    out = tmp_path / "x" / "run"
    with pytest.raises(RuntimeError):
        with claim_output_dir(out):
            raise RuntimeError("refused by a later check, before writing")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- sweeps


def _sweep(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(small_raw(train__rounds=1)))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "base.yaml", "grid": {"train.lr": [0.05, 0.2]}}))
    return path


def test_a_sweep_run_is_cleared_and_redone_in_its_claimed_folder(tmp_path):
    """What a sweep's task does with an interrupted run's folder: clear it, hold it, run."""
    from fedsim.scenario import parse_scenario
    from fedsim.compare.sweep import _run_task

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.1}\n{"round": 2, "acc')  # killed mid-run
    (run_dir / "accuracy.png").write_bytes(b"stale plot")
    summary = _run_task(parse_scenario(small_raw(train__rounds=1)).to_yaml(), str(run_dir))
    assert summary["rounds"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "scenario.yaml", "summary.json"]


def test_a_sweep_refuses_a_run_folder_holding_foreign_files_before_starting(tmp_path, capsys):
    from fedsim.compare.sweep import load_sweep

    _, runs = load_sweep(_sweep(tmp_path))
    run_dir = tmp_path / "out" / "tiny" / "runs" / runs[1].name
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert f"sweep run {runs[1].name}: output folder" in err and "notes.txt" in err
    assert sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir()) == ["runs"]  # nothing started


def test_a_sweep_folder_is_held_by_one_sweep_and_checked_first(tmp_path, capsys):
    from fedsim.run.outdir import hold_folder

    sweep = _sweep(tmp_path)
    (tmp_path / "out" / "tiny").mkdir(parents=True)
    with hold_folder(tmp_path / "out" / "tiny"):
        assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "is in use by another run" in _one_error_line(capsys)
    (tmp_path / "a_file").write_text("x")
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "a_file"), "--quiet"]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- the attack script


@pytest.mark.usefixtures("one_torch_thread")
def test_the_attack_script_checks_its_folder_before_the_attack(tmp_path, capsys):
    from attacks.cli import main as attack_main

    common = ["--attack", "idlg", "--iterations", "2", "--threads", "1"]
    (tmp_path / "a_file").write_text("x")
    assert attack_main([*common, "--out", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "output folder" in err and "is a file, not a folder" in err
    out = tmp_path / "attack"
    assert attack_main([*common, "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert attack_main([*common, "--out", str(out)]) == 2
    assert "holds the results of another run" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert attack_main([*common, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["reconstruction.png", "results.json"]
