"""engine.device, audit.device and ``python -m attacks --device`` (fedsim.world.device).

The round tests run on every device torch sees (cpu, given explicitly, here; cuda and mps wherever
present): a tensor left on the CPU by any engine, strategy client rule, codec or defense fails them on a GPU.
The ray engine's is in tests/test_engine_ray.py (beside the Ray it shares).
On the CPU a run with the device given is the run without it, bit for bit; on another device float kernels
differ, so the figures are compared within a tolerance there.
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fedsim.cli import main as fedsim_main
from fedsim.engines import inline, run_scenario
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world.device import resolve_device, visible_devices
from tests.conftest import small_raw

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else [])

# One short run through every device-sensitive step the engines share: SCAFFOLD's control variates (Context.state
# and an extra record each way), the noise defense's seeded draw, DGC's residuals in Context.state.
# 100 clients of ~13 samples, 4 a round: the audited client's few images are attacked, scored and their I2F
# shift predicted (the noise defense and DGC perturb the upload) in about a second.
DEVICE_ROUND = dict(strategy={"name": "scaffold"}, upload={"codec": "dgc", "ratio": 0.2},
                    defense={"name": "noise", "variance": 1e-6}, train__rounds=2, data__num_clients=100,
                    train__participation=0.04)
COMPARED = ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "participants")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, name: str, **overrides) -> list[dict]:
    out = tmp_path / name
    run_scenario(parse_scenario(small_raw(**DEVICE_ROUND, **overrides)), out, progress=False)
    return _metrics(out)


def _assert_same(rows: list[dict], baseline: list[dict], device: str) -> None:
    assert len(rows) == len(baseline) == DEVICE_ROUND["train__rounds"]
    for row, base in zip(rows, baseline):
        for key in COMPARED:
            if device == "cpu":  # the default run on this machine is a CPU run: nothing may change
                assert row[key] == base[key], (key, row[key], base[key])
            else:  # float kernels differ on a GPU: the same run within rounding
                assert row[key] == pytest.approx(base[key], rel=1e-3, abs=1e-2), (key, row[key], base[key])


@pytest.fixture(scope="module")
def cpu_baselines(tmp_path_factory):
    """Each engine's run without a device setting, on the CPU (``auto`` resolves to cpu here; on a GPU
    machine the baseline is pinned to the CPU it is compared with)."""
    cache = {}

    def baseline(engine: str) -> list[dict]:
        if engine not in cache:
            overrides = {"engine__name": engine}
            if resolve_device("auto").type != "cpu":
                overrides["engine__device"] = "cpu"
            cache[engine] = _run(tmp_path_factory.mktemp("baseline"), engine, **overrides)
        return cache[engine]

    return baseline


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", ["inline", "vectorized"])
def test_round_on_device_matches_cpu(tmp_path, cpu_baselines, engine, device, one_torch_thread, monkeypatch):
    """On inline, the audit is on too (audit.device defaults to engine.device): its attack, the I2F prediction
    and the membership attack run on the device, the training metrics are still the run's without audit, and
    the round is scored."""
    audit = {}
    if engine == "inline":  # the attack in a thread of this process: no spawned worker to start (seconds)
        monkeypatch.setattr(inline.InlineGrid, "audit_executor", lambda self: ThreadPoolExecutor(max_workers=1),
                            raising=False)
        audit = {"audit": {"attack": "ig", "attack_config": {"iterations": 3}, "every": 2, "membership": "loss"}}
    rows = _run(tmp_path, f"{engine}-{device}", engine__name=engine, engine__device=device, **audit)
    _assert_same(rows, cpu_baselines(engine), device)
    if audit:
        audited = [json.loads(line) for line in (tmp_path / f"{engine}-{device}" / "audit.jsonl").read_text().splitlines()]
        assert [r["round"] for r in audited] == [2]
        assert math.isfinite(audited[0]["psnr"]) and audited[0]["i2f_psnr"] is not None
        assert 0.0 <= audited[0]["membership_auc"] <= 1.0


def _unseen() -> list[str]:
    """Device names torch does not see on this machine (and a malformed one)."""
    seen = visible_devices()
    return ["gpu", "cuda:1x", *(["cuda"] if "cuda:0" not in seen else []), *(["cuda:7"] if "cuda:7" not in seen else []),
            *(["mps"] if "mps" not in seen else [])]


@pytest.mark.parametrize("name", _unseen())
def test_unseen_device_is_one_line(name):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(small_raw(engine__device=name))
    message = str(err.value)
    assert message.startswith("engine.device: ") and "\n" not in message
    assert name in message
    if name not in ("gpu", "cuda:1x"):
        assert message.endswith(f"torch sees {', '.join(visible_devices())}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_refused_by_the_command_exit_2(tmp_path, capsys):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw()))
    assert fedsim_main(["validate", str(path), "--set", "engine.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "engine.device: cuda is not available: torch sees cpu" in err


def test_audit_device_and_ray_gpu_shares_checked():
    with pytest.raises(ScenarioError, match=r"^audit\.device: expected one of auto, cpu"):
        parse_scenario(small_raw(audit={"attack": "ig", "device": "tpu"}))
    with pytest.raises(ScenarioError, match=r"^engine\.ray\.num_gpus_per_client: "):
        parse_scenario(small_raw(engine__ray__num_gpus_per_client=-0.5))
    assert parse_scenario(small_raw(engine__ray__num_gpus_per_client=0.25)).engine.ray.num_gpus_per_client == 0.25
    assert parse_scenario(small_raw(audit={"attack": "ig"}, engine__device="cpu")).audit_device() == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_attacks_command_on_device(tmp_path, device, capsys):
    """``python -m attacks --device``: the same scored reconstruction as without it on the CPU."""
    from attacks.cli import main as attacks_main

    common = ["--attack", "ig", "--model", "mlp", "--batch-size", "2", "--iterations", "4", "--threads", "1"]
    pinned = [] if resolve_device("auto").type == "cpu" else ["--device", "cpu"]  # the run without the flag
    assert attacks_main([*common, *pinned, "--out", str(tmp_path / "cpu")]) == 0
    assert attacks_main([*common, "--device", device, "--out", str(tmp_path / device / "explicit")]) == 0
    cpu = json.loads((tmp_path / "cpu" / "results.json").read_text())
    run = json.loads((tmp_path / device / "explicit" / "results.json").read_text())
    assert run["settings"]["device"] == device and run["iterations"] == cpu["iterations"] == 4
    if device == "cpu":
        assert run["psnr"] == cpu["psnr"] and run["final_loss"] == cpu["final_loss"]
    else:  # another generator and other kernels: a reconstruction, not the CPU's
        assert math.isfinite(run["psnr"])
    assert attacks_main([*common, "--device", "cuda:9", "--out", str(tmp_path / "bad")]) == 2
    assert "--device: cuda:9 is not available" in capsys.readouterr().err
