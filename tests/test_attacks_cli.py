"""The attack script: results.json, PNG, YAML, exit code 2 on bad arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "attacks", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_writes_results(tmp_path):
    out = tmp_path / "run"
    proc = _run("--attack", "idlg", "--model", "lenet", "--dataset", "digits", "--batch-size", "1",
                "--seed", "0", "--iterations", "20", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    for key in ("psnr", "ssim", "label_accuracy", "iterations", "stopped", "wall_s"):
        assert key in res
    assert res["psnr"] >= 30 and res["label_accuracy"] == 1.0
    assert f"{res['iterations']} iterations (stopped: {res['stopped']})" in proc.stdout
    assert (out / "reconstruction.png").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_yaml_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attack: sme\nmodel: lenet\ndataset: digits\nbatch_size: 2\nthreat: update\n"
                   "local_steps: 3\nlabels_known: true\niterations: 10\nthreads: 1\n"
                   f"out: {tmp_path / 'y'}\nattack_config: {{tv: 0.0001}}\n")
    proc = _run("--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "y" / "results.json").read_text())
    assert res["attack"] == "sme" and res["iterations"] == 10 and res["local_steps"] == 3


@pytest.mark.parametrize("args", [
    ["--attack", "nope"],
    ["--batch-size", "0"],
    ["--dropout", "1.5"],
    ["--attack", "sme", "--threat", "gradient"],
    ["--attack", "dia"],
    ["--unknown-flag"],
    ["--seed", "x"],
    ["--stop-patience", "-1"],
    ["--stop-tol", "nan"],
])
def test_cli_bad_arguments_exit_2_with_one_line(args, tmp_path):
    proc = _run(*args, "--out", str(tmp_path / "never"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


def test_cli_bad_yaml_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("atack: dlg\n")
    proc = _run("--config", str(cfg))
    assert proc.returncode == 2 and "atack" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_stop_settings_reach_the_attack(tmp_path, capsys):
    # The same DLG run with the stop off (the whole budget) and on (converges by step 30 on
    # 8x8 digits); in-process, since the script's plumbing is covered above.
    from attacks.cli import main

    common = ["--attack", "dlg", "--dataset", "digits", "--seed", "1", "--iterations", "60"]
    assert main([*common, "--stop-patience", "0", "--out", str(tmp_path / "off")]) == 0
    assert main([*common, "--stop-patience", "10", "--stop-tol", "0.001", "--out", str(tmp_path / "on")]) == 0
    assert "60 iterations (stopped: budget)" in capsys.readouterr().out
    off, on = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("off", "on"))
    assert (off["iterations"], off["stopped"]) == (60, "budget")
    assert on["stopped"] == "converged" and on["iterations"] < 60 and on["psnr"] >= off["psnr"] - 0.5


def test_cli_bad_stop_setting_in_attack_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"attack: ig\niterations: 5\nout: {tmp_path / 'never'}\nattack_config: {{stop_patience: -3}}\n")
    proc = _run("--config", str(cfg))
    assert proc.returncode == 2 and "stop_patience" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
