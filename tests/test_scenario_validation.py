"""Malformed scenarios: one line on stderr naming the key, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.cli import main
from tests.conftest import small_raw

BAD = [
    ({"foo": 1}, "foo"),
    ({"data__partition__alpha": -1, "data__partition__name": "dirichlet"}, "data.partition.alpha"),
    ({"data__num_clients": 0}, "data.num_clients"),
    ({"data__num_clients": 100000}, "clients"),
    ({"train__rounds": "ten"}, "train.rounds"),
    ({"strategy__name": "nope"}, "strategy.name"),
    ({"strategy__mu": 0.1}, "strategy.mu"),
    ({"strategy__name": "fedprox", "strategy__mu": -1}, "strategy.mu"),
    ({"engine__name": "gpu"}, "engine.name"),
    ({"model__name": "vgg"}, "model.name"),
    ({"train__participation": 1.5}, "train.participation"),
    ({"model__dropout": 1.0}, "model.dropout"),
    ({"upload": "topk"}, "upload"),
    ({"data__dataset": "mnist"}, "data"),
    ({"data__partition__name": "pathological", "data__partition__classes_per_client": 11}, "classes_per_client"),
    ({"train__sampling": "poisson"}, "train.sampling"),
    ({"data__partition__bogus": 3}, "data.partition.bogus"),
    ({"data__dataset": "cifar10", "data__source": "hub"}, "hub"),  # offline in tests: HF_HUB_OFFLINE=1
]


def _write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("overrides,needle", BAD, ids=[n for _, n in BAD])
def test_bad_scenario_exit_2_one_line(tmp_path, capsys, overrides, needle):
    path = _write(tmp_path, small_raw(**overrides))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedsim: error:") and needle in err, err
    assert not out.exists()


def test_unknown_key_lists_allowed_keys(tmp_path, capsys):
    path = _write(tmp_path, small_raw(train__epochs=3))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "local_epochs" in err


@pytest.mark.parametrize("content,needle", [("a: [1, 2", "not valid YAML"), ("", "empty"), ("- 1\n- 2\n", "mapping")])
def test_bad_files(tmp_path, capsys, content, needle):
    path = tmp_path / "s.yaml"
    path.write_text(content)
    assert main(["validate", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_missing_file_and_bad_override(tmp_path, capsys):
    assert main([str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    path = _write(tmp_path, small_raw())
    assert main([str(path), "--set", "train.rounds"]) == 2
    assert "key.path=value" in capsys.readouterr().err
    assert main([str(path), "--set", "train.rounds=0"]) == 2
    assert "train.rounds" in capsys.readouterr().err


def test_override_applies(tmp_path, capsys):
    path = _write(tmp_path, small_raw())
    assert main(["validate", str(path), "--set", "train.rounds=7", "--set", "strategy.name=fedprox"]) == 0
    out = capsys.readouterr().out
    assert "7 rounds" in out and "fedprox" in out


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = _write(tmp_path, small_raw(data__partition__alpha=0))
    proc = subprocess.run([sys.executable, "-m", "fedsim", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert not (tmp_path / "o").exists()
