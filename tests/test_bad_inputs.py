"""The remaining bad inputs: each is one line on stderr naming the problem, exit code 2 (130 for
Ctrl-C), no traceback, and nothing written. In-process through the real command lines
(``fedsim.cli.main``, ``attacks.cli.main``); in a subprocess only where the process itself is the
point (warnings on the real stderr, a real SIGINT)."""

import gzip
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim.cli import main
from tests.conftest import small_raw

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}
BASE = yaml.safe_dump(small_raw())


def _refused(capsys, argv: list[str], out: Path, needle: str, *, prefix: str = "fedsim: error:",
             run=main, code: int = 2) -> str:
    assert run(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    assert err.startswith(prefix) and needle in err, err[:2000]
    assert len(err) <= 600, f"{len(err)} characters"
    assert not out.exists()
    return err


# ----------------------------------------------------------------------------- scenario files


def _alias_bomb(levels: int, under: str) -> str:
    """The billion laughs: each level a list of 9 aliases of the one before (9**levels values)."""
    lines = ["x0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{under}: *l{levels - 1}\n"


FILES = [
    ("non-utf8", "name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1)"),
    ("duplicate top-level key", (BASE + "seed: 3\n").encode(), "duplicate key 'seed'"),
    ("duplicate nested key", b"train:\n  rounds: 2\n  lr: 0.1\n  rounds: 3\n", "line 4: duplicate key 'rounds'"),
    ("alias bomb", _alias_bomb(9, "name").encode(), "aliases expand to more than"),
    ("recursive alias", b"name: &a [x, *a]\n", "an alias refers to the node that contains it"),
    ("deep nesting", ("seed: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested more than"),
]


@pytest.mark.parametrize("content,needle", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_a_bad_scenario_file(tmp_path, capsys, content, needle):
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    _refused(capsys, [str(path), "--out", str(tmp_path / "out")], tmp_path / "out", needle)


def test_merge_keys_still_override(tmp_path, capsys):
    """``<<: *base`` then the same key is an override, not a duplicate."""
    path = tmp_path / "s.yaml"
    raw = small_raw()
    del raw["train"]
    text = yaml.safe_dump(raw) + "train:\n  <<: {rounds: 9, lr: 0.1}\n  rounds: 3\n"
    path.write_text(text)
    assert main(["validate", str(path)]) == 0
    assert "3 rounds" in capsys.readouterr().out


def test_an_unreadable_scenario_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    real = Path.read_bytes

    def denied(self):  # root reads any mode bits: the refusal is simulated at the read itself
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    _refused(capsys, [str(path), "--out", str(tmp_path / "out")], tmp_path / "out",
             f"{path}: cannot read the file (Permission denied)")


def test_a_folder_given_as_the_scenario_file(tmp_path, capsys):
    _refused(capsys, [str(tmp_path), "--out", str(tmp_path / "out")], tmp_path / "out", "is a folder, not a scenario file")


# ----------------------------------------------------------------------------- echoed values


ECHOES = [
    ("alias list at an int", _alias_bomb(4, "seed"), "seed: Input should be a valid integer (got [["),
    ("1 MB string as a literal", BASE.replace("name: mlp", "name: " + "x" * 1_000_000), "model.name: Input should be"),
    ("1 MB defense name", BASE + "defense: {name: " + "d" * 1_000_000 + "}\n", "defense.name: unknown defense 'ddd"),
]


@pytest.mark.parametrize("content,needle", [e[1:] for e in ECHOES], ids=[e[0] for e in ECHOES])
def test_a_huge_value_is_echoed_in_a_few_hundred_characters(tmp_path, capsys, content, needle):
    path = tmp_path / "s.yaml"
    path.write_text(content)
    err = _refused(capsys, [str(path), "--out", str(tmp_path / "out")], tmp_path / "out", needle)
    assert "..." in err


# ----------------------------------------------------------------------------- values

VALUES = [
    (["train.lr=.inf"], "train.lr: must be finite, got inf"),
    (["train.weight_decay=.nan"], "train.weight_decay: must be finite, got nan"),
    (["strategy.name=fedprox", "strategy.mu=.inf"], "strategy.mu: must be finite, got inf"),
    (["strategy.name=fedprox", "strategy.mu=-.inf"], "strategy.mu: must be finite, got -inf"),
    (["defense={name: noise, variance: .inf}"], "defense.variance: must be finite, got inf"),
    (["upload={codec: topk, ratio: .nan}"], "upload.ratio: must be finite, got nan"),
    (["engine.timeout_s=.inf"], "engine.timeout_s: must be finite, got inf"),
    # text that pydantic reads as a float is checked as the number it becomes
    (["train.lr=inf"], "train.lr: must be finite, got inf"),
    (["defense={name: noise, variance: '1e999'}"], "defense.variance: must be finite, got inf"),
    (["strategy.name=fedprox", "strategy.mu=Infinity"], "strategy.mu: must be finite, got inf"),
    (["data.partition.name=dirichlet", "data.partition.alpha=.inf"], "data.partition.alpha: must be finite, got inf"),
    # sizes that cannot be allocated: refused from the sizes, before anything is built
    (["model.hidden=[100000000000]"], "model.hidden: the model (7.5e+12 parameters"),
    (["model.hidden=[100000000000]", "engine.name=ray"], "model.hidden: the model"),
    (["data.dataset=synthetic", "data.synthetic.train=10000000000"], "data.synthetic: the data set (10000000500 images"),
    (["data.dataset=synthetic", "data.synthetic.classes=10000000000"], "data.synthetic.classes: the model"),
]


@pytest.mark.parametrize("overrides,needle", VALUES, ids=[v[1].split(":")[0] + "=" + v[0][-1].split("=")[1][:12]
                                                          for v in VALUES])
def test_a_bad_value(tmp_path, capsys, overrides, needle):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    argv = [str(path), "--out", str(tmp_path / "out")]
    for o in overrides:
        argv += ["--set", o]
    err = _refused(capsys, argv, tmp_path / "out", needle)
    if "the model" in needle or "the data set" in needle:
        assert "of memory is available" in err


# ----------------------------------------------------------------------------- data files


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist(root: Path, gz: bool = True, **replace: bytes) -> Path:
    """A small MNIST folder (20 training, 10 test images); ``replace`` swaps a file's bytes."""
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        files[f"{prefix}-images-idx3-ubyte"] = _idx(rng.integers(0, 256, (n, 28, 28)))
        files[f"{prefix}-labels-idx1-ubyte"] = _idx(np.arange(n) % 10)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        data = replace.get(name.replace("-", "_"), gzip.compress(data) if gz else data)
        (root / (name + (".gz" if gz else ""))).write_bytes(data)
    return root


def _cifar(root: Path, **replace: bytes) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(replace.get(name, pickle.dumps(batch)))
    return root


def _train_images() -> bytes:
    return _idx(np.zeros((20, 28, 28)))


DATA = [
    ("mnist truncated gzip", "mnist",
     lambda r: _mnist(r, train_images_idx3_ubyte=gzip.compress(_idx(np.zeros((20, 28, 28))))[:-30]),
     "data.root: ", "train-images-idx3-ubyte.gz cannot be read: Compressed file ended"),
    ("mnist not gzip", "mnist", lambda r: _mnist(r, train_images_idx3_ubyte=b"\x1f\x8b garbage, not a gzip stream"),
     "data.root: ", "train-images-idx3-ubyte.gz cannot be read"),
    ("mnist corrupt gzip", "mnist",
     lambda r: _mnist(r, t10k_labels_idx1_ubyte=gzip.compress(_idx(np.zeros(10)))[:12] + b"\xff" * 40),
     "data.root: ", "t10k-labels-idx1-ubyte.gz cannot be read"),
    ("mnist truncated idx", "mnist", lambda r: _mnist(r, gz=False, train_images_idx3_ubyte=_train_images()[:-100]),
     "data.root: ", "is truncated or padded: its header says 15680 values, it holds 15580"),
    ("mnist count mismatch", "mnist", lambda r: _mnist(r, train_labels_idx1_ubyte=gzip.compress(_idx(np.zeros(19)))),
     "data.root: ", "20 images but 19 labels"),
    ("mnist label out of range", "mnist",
     lambda r: _mnist(r, t10k_labels_idx1_ubyte=gzip.compress(_idx(np.full(10, 12)))),
     "data.root: ", "labels must be 0..9, found 12..12"),
    ("mnist labels not 1-d", "mnist",
     lambda r: _mnist(r, train_labels_idx1_ubyte=gzip.compress(_idx(np.zeros((20, 2))))),
     "data.root: ", "is not a 1-dimensional IDX file"),
    ("cifar truncated batch", "cifar10",
     lambda r: _cifar(r, data_batch_3=pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4})[:-500]),
     "data.root: ", "data_batch_3 is not a CIFAR-10 python batch"),
    ("cifar count mismatch", "cifar10",
     lambda r: _cifar(r, test_batch=pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})),
     "data.root: ", "test_batch: 4 images but 3 labels"),
]


@pytest.mark.parametrize("dataset,make,key,needle", [d[1:] for d in DATA], ids=[d[0] for d in DATA])
def test_a_corrupt_data_file(tmp_path, capsys, dataset, make, key, needle):
    root = make(tmp_path / "data")
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    err = _refused(capsys, [str(path), "--out", str(tmp_path / "out"), "--set", f"data.dataset={dataset}",
                            "--set", f"data.root={root}"], tmp_path / "out", needle)
    assert err.startswith(f"fedsim: error: {key}"), err


@pytest.mark.parametrize("dataset,make", [("mnist", _mnist), ("cifar10", _cifar)])
def test_the_small_data_files_themselves_are_fine(tmp_path, capsys, dataset, make):
    root = make(tmp_path / "data")
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    assert main(["validate", str(path), "--set", f"data.dataset={dataset}", "--set", f"data.root={root}",
                 "--set", "data.num_clients=2"]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- the attack script


def _attack_config(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


ATTACK = [
    ("batch larger than the data set", lambda t: ["--batch-size", "5000"], "batch_size 5000 is larger than the data set"),
    ("unknown attack setting", lambda t: ["--config", _attack_config(t, "attack: ig\nattack_config: {colour: red}\n")],
     "attack_config: InvertingGradientsAttack.__init__() got an unexpected keyword argument 'colour'"),
    ("duplicate config key", lambda t: ["--config", _attack_config(t, "attack: dlg\nseed: 1\nseed: 2\n")],
     "duplicate key 'seed'"),
    ("non-utf8 config", lambda t: ["--config", _attack_config(t, b"attack: \xff\n")], "cannot read config"),
    ("alias bomb config", lambda t: ["--config", _attack_config(t, _alias_bomb(9, "attack_config"))],
     "aliases expand to more than"),
    ("image size that cannot be allocated", lambda t: ["--image-size", "100000"],
     "image_size: the data set (1797 images of 1x100000x100000) needs at least"),
]


@pytest.mark.parametrize("make,needle", [a[1:] for a in ATTACK], ids=[a[0] for a in ATTACK])
def test_the_attack_script_refuses(tmp_path, capsys, make, needle):
    from attacks.cli import main as attack_main

    out = tmp_path / "out"
    _refused(capsys, [*make(tmp_path), "--iterations", "2", "--out", str(out)], out, needle,
             prefix="python -m attacks: error:", run=attack_main)


# ----------------------------------------------------------------------------- Ctrl-C, warnings


def test_ctrl_c_in_start_up_in_process(tmp_path, capsys, monkeypatch):
    import attacks.cli
    import fedsim.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    monkeypatch.setattr(fedsim.cli, "prepare", interrupted)
    _refused(capsys, [str(path), "--out", str(tmp_path / "out")], tmp_path / "out",
             "interrupted during start-up; nothing was written", prefix="fedsim:", code=130)
    monkeypatch.setattr(attacks.cli, "run", interrupted)
    _refused(capsys, ["--out", str(tmp_path / "out")], tmp_path / "out", "interrupted; no results written",
             prefix="python -m attacks:", run=attacks.cli.main, code=130)


def test_ctrl_c_in_start_up_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT a second into start-up (importing torch and Flower, checking the data take
    several seconds): one line, exit 130, no traceback, no output folder."""
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim", str(path), "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedsim: interrupted"), err
    assert not (tmp_path / "out").exists()


def test_library_warnings_do_not_precede_the_one_line(tmp_path):
    """flwr-datasets warns at every failed Dirichlet draw before giving up; the scenario is
    refused with its one line alone."""
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    proc = subprocess.run([sys.executable, "-m", "fedsim", str(path), "--out", str(tmp_path / "out"),
                           "--set", "data.partition.name=dirichlet", "--set", "data.partition.alpha=1e308"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("fedsim: error: data") and "Warning" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["mlp", "lenet", "cnn", "resnet18"])
def test_the_memory_check_counts_parameters_as_the_built_model_has_them(name):
    """Counted without allocating (arithmetic for the mlp, PyTorch's meta device for the rest)."""
    from fedsim.world.memory import model_parameters
    from fedsim.world.models import build_model

    built = build_model(name, 3, 16, 7, hidden=(33, 5))
    assert model_parameters(name, 3, 16, 7, (33, 5)) == sum(p.numel() for p in built.parameters())


# ----------------------------------------------------------------------------- issue 21 items 5, 6, 9


@pytest.fixture(scope="module")
def _a_cut_run(tmp_path_factory):
    """A run of 3 rounds stopped by Ctrl-C after round 2 (its checkpoint kept), and the same run complete."""
    from fedsim.engines import run_scenario
    from fedsim.run import apps
    from fedsim.run.observers import ProgressObserver
    from fedsim.scenario import parse_scenario

    base = tmp_path_factory.mktemp("runs")

    class CtrlC(ProgressObserver):
        def on_round(self, record):
            super().on_round(record)
            if record.server_round == 2:
                raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(apps, "ProgressObserver", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(parse_scenario(small_raw(train__rounds=3)), base / "cut", progress=False)
    mp.undo()
    run_scenario(parse_scenario(small_raw(train__rounds=2)), base / "done", progress=False)
    (base / "done" / "audit.jsonl").write_text('{"round": 1, "client": 0, "attack": "dlg", "threat": "gradient", '
                                               '"psnr": 12.5, "ssim": 0.1}\n')
    return base


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


RUN_FILES = [
    ("scenario.yaml", b"name: caf\xe9\n", "scenario.yaml: not UTF-8 text"),
    ("scenario.yaml", b"name: [\n", "scenario.yaml: not valid YAML"),
    ("scenario.yaml", b"- 1\n", "scenario.yaml: top level must be a mapping"),
    ("scenario.yaml", b"train: {rounds: 0}\n", "scenario.yaml: train.rounds"),
    ("metrics.jsonl", b'{"round": 1}\nxx\n', "metrics.jsonl: line 2 is not JSON"),
    ("metrics.jsonl", b"[1]\n", "metrics.jsonl: line 1 is a JSON list"),
    ("metrics.jsonl", b"\xff\n", "metrics.jsonl: not UTF-8 text"),
    ("metrics.jsonl", b'{"round": "1"}\n', "metrics.jsonl: row 1 has round '1'"),
    ("summary.json", b'{"accuracy": ', "summary.json: not JSON"),
    ("summary.json", b"[1, 2]", "summary.json: expected a JSON object, found a list"),
]


@pytest.mark.parametrize("name,content,needle", RUN_FILES, ids=[f"{f[0]}-{f[2].split(': ', 1)[1][:20]}" for f in RUN_FILES])
def test_resume_refuses_a_bad_run_file(_a_cut_run, tmp_path, capsys, name, content, needle):
    import shutil

    from fedsim.run.resume import main as resume_main

    run = tmp_path / "run"
    shutil.copytree(_a_cut_run / "cut", run)
    (run / name).write_bytes(content)
    before = _files(run)
    assert resume_main([str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedsim: error: {run / name.split(':')[0]}") or needle in err, err
    assert needle in err, err
    assert _files(run) == before  # nothing written


REPORT_FILES = [
    ("summary.json", b'{"accuracy": ', "summary.json: not JSON"),
    ("summary.json", b'{"name": "caf\xe9"}', "summary.json: not UTF-8 text"),
    ("summary.json", b"[1]", "summary.json: expected a JSON object"),
    ("metrics.jsonl", b'{"round": 1, "accuracy": 0.5, "bytes_up": 1, "bytes_down": 1}\n{"round": 2\n',
     "metrics.jsonl: line 2 is not JSON"),
    ("metrics.jsonl", b'{"round": 1}\n', "metrics.jsonl: row 1 lacks 'accuracy'"),
    ("metrics.jsonl", b'{"round": 1, "accuracy": "high", "bytes_up": 1, "bytes_down": 1}\n',
     "metrics.jsonl: row 1: accuracy is 'high', expected a number"),
    ("audit.jsonl", b'{"round": 1\n', "audit.jsonl: line 1 is not JSON"),
    ("audit.jsonl", b'{"round": 1}\n', "audit.jsonl: row 1 lacks 'client'"),
    ("audit.jsonl", b'{"round": 1, "client": 0, "attack": "dlg", "threat": "gradient", "psnr": "a"}\n',
     "audit.jsonl: row 1: psnr is 'a'"),
    ("audit.jsonl", b"\xfe\n", "audit.jsonl: not UTF-8 text"),
]


@pytest.mark.parametrize("name,content,needle", REPORT_FILES,
                         ids=[f"{f[0]}-{f[2].split(': ', 1)[1][:20]}" for f in REPORT_FILES])
def test_report_refuses_a_bad_run_file(_a_cut_run, tmp_path, capsys, name, content, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(_a_cut_run / "done", run)
    (run / name).write_bytes(content)
    before = _files(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedsim: error: {run / name}") and needle in err, err
    assert _files(run) == before  # no report.html, no report/ pictures


def test_report_and_resume_in_a_read_only_folder(_a_cut_run, tmp_path, capsys, monkeypatch):
    """Root writes anywhere: the refusal is simulated at the file system call itself."""
    import os as _os
    import shutil
    import tempfile as _tempfile

    from fedsim.run.resume import main as resume_main

    for name in ("cut", "done"):
        shutil.copytree(_a_cut_run / name, tmp_path / name)
    before = {n: _files(tmp_path / n) for n in ("cut", "done")}
    real_mkstemp, real_open = _tempfile.mkstemp, _os.open

    def read_only_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(tmp_path.resolve()):
            raise OSError(30, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def read_only_open(path, flags, *args, **kwargs):
        if flags & _os.O_CREAT and Path(path).resolve().is_relative_to(tmp_path.resolve()):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(_tempfile, "mkstemp", read_only_mkstemp)
    monkeypatch.setattr(_os, "open", read_only_open)
    assert main(["report", str(tmp_path / "done")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedsim: error: {tmp_path / 'done' / 'report.html'}: cannot write the report (Read-only file system)"
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err and str(tmp_path / "cut") in err, err
    monkeypatch.undo()
    assert before == {n: _files(tmp_path / n) for n in ("cut", "done")}


def test_report_still_writes_a_good_run(_a_cut_run, tmp_path, capsys):
    import shutil

    shutil.copytree(_a_cut_run / "done", tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file()


LATE = [
    (["train.rounds=true"], "train.rounds: must be a number, got true"),
    (["train.batch_size=false"], "train.batch_size: must be a number, got false"),
    (["model.hidden=[32, true]"], "model.hidden.1: must be a number, got true"),
    (["strategy.name=fedprox", "strategy.mu=true"], "strategy.mu: must be a number, got true"),
    (["upload={codec: topk, ratio: true}"], "upload.ratio: must be a number, got true"),
    (["audit={clients: true}"], "audit.clients: must be a number, got true"),
    (["seed=18446744073709551616"], "seed: Input should be less than or equal to 9223372036854775807"),
    (["audit={seed: 18446744073709551616, attack: ig, attack_config: {iterations: 2}}"],
     "audit.seed: Input should be less than or equal to 9223372036854775807"),
    (["engine.torch_threads=1000000"], "engine.torch_threads: Input should be less than or equal to 1024"),
    (["audit={attack: ig, attack_config: {stop_tol: abc}}"], "audit.attack_config: stop_tol: expected float, got str"),
    (["audit={attack: dlg, threat: gradient, attack_config: {steps: '2'}}"],
     "audit.attack_config: steps: expected int, got str '2'"),
    (["audit={attack: ig, attack_config: {seed: 3}}"], "audit.attack_config: seed: set audit.seed"),
]


@pytest.mark.parametrize("overrides,needle", LATE, ids=[v[1].split(":")[0] + "-" + v[0][-1][-20:] for v in LATE])
def test_a_setting_that_used_to_fail_later(tmp_path, capsys, overrides, needle):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    argv = [str(path), "--out", str(tmp_path / "out")]
    for o in overrides:
        argv += ["--set", o]
    _refused(capsys, argv, tmp_path / "out", needle)


def test_yaml_integers_and_floats_still_pass(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    assert main(["validate", str(path), "--set", "train.rounds=3", "--set", "train.lr=1", "--set",
                 "seed=9223372036854775807", "--set", "engine.torch_threads=1024", "--set",
                 "audit={attack: ig, attack_config: {iterations: 2, lr: 1, stop_tol: 0.01}}"]) == 0, capsys.readouterr().err


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [str(path), "--out", ""], tmp_path / "runs", "--out: must be a folder path, got ''")


@pytest.mark.parametrize("argv,needle", [
    (["--image-size", "3"], "argument --image-size: must be >= 4 (as data.image_size), got 3"),
    (["--seed", "18446744073709551616"], "argument --seed: must be <= 9223372036854775807"),
])
def test_the_attack_script_takes_the_scenarios_bounds(tmp_path, capsys, argv, needle):
    from attacks.cli import main as attack_main

    out = tmp_path / "out"
    _refused(capsys, [*argv, "--iterations", "2", "--out", str(out)], out, needle,
             prefix="python -m attacks: error:", run=attack_main)


def test_the_attack_script_checks_attack_config_types(tmp_path, capsys):
    from attacks.cli import main as attack_main

    out = tmp_path / "out"
    config = _attack_config(tmp_path, "attack: ig\nattack_config: {stop_tol: abc}\n")
    _refused(capsys, ["--config", config, "--iterations", "2", "--out", str(out)], out,
             "attack_config: stop_tol: expected float, got str 'abc'", prefix="python -m attacks: error:", run=attack_main)


def test_a_gzip_that_inflates_beyond_its_header_is_refused_unread(tmp_path, capsys, monkeypatch):
    """A 10 MB stream of zeros behind a header promising 20 images: refused after reading about what
    the header promised, not inflated whole."""
    import gzip as _gzip

    bomb = _gzip.compress(_idx(np.zeros((20, 28, 28))) + bytes(10_000_000))
    root = _mnist(tmp_path / "data", train_images_idx3_ubyte=bomb)
    read = []
    real_read = _gzip.GzipFile.read

    def counted(self, size=-1):
        assert size is not None and size >= 0, "read whole"
        out = real_read(self, size)
        read.append(len(out))
        return out

    monkeypatch.setattr(_gzip.GzipFile, "read", counted)
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    _refused(capsys, [str(path), "--out", str(tmp_path / "out"), "--set", "data.dataset=mnist",
                      "--set", f"data.root={root}"], tmp_path / "out",
             "train-images-idx3-ubyte.gz inflates to more than the 15696 bytes its IDX header promises")
    assert sum(read) <= 20_000


def test_a_fifo_as_a_data_file_is_refused_not_waited_on(tmp_path, capsys):
    root = _mnist(tmp_path / "data")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(root / "t10k-labels-idx1-ubyte.gz")
    croot = _cifar(tmp_path / "cdata")
    (croot / "cifar-10-batches-py" / "test_batch").unlink()
    os.mkfifo(croot / "cifar-10-batches-py" / "test_batch")
    path = tmp_path / "s.yaml"
    path.write_text(BASE)
    _refused(capsys, [str(path), "--out", str(tmp_path / "out"), "--set", "data.dataset=mnist",
                      "--set", f"data.root={root}"], tmp_path / "out",
             "t10k-labels-idx1-ubyte.gz is a FIFO, not a data file")
    _refused(capsys, [str(path), "--out", str(tmp_path / "out"), "--set", "data.dataset=cifar10",
                      "--set", f"data.root={croot}"], tmp_path / "out", "test_batch is a FIFO, not a data file")


@pytest.mark.parametrize("make, needle", [
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: os.symlink("/dev/null", p), "is not a regular file"),
    (lambda p: p.write_bytes(b"#" * (10 * 2**20 + 4096)), "10,489,856 bytes is too large"),
], ids=["fifo", "device", "just-over-the-limit"])
def test_a_scenario_path_that_is_no_scenario_file_says_what_it_is(tmp_path, capsys, make, needle):
    """Not 'not found' for a FIFO or a device (and no wait on the FIFO), not '10 MiB is too large' for a file
    a few kB over 10 MiB (issue 21 item 10)."""
    path = tmp_path / "s.yaml"
    make(path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
