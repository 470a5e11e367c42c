"""``econtrol`` (strategies/compression/econtrol.py): EControl (Gao, Islamov, Stich, ICLR 2024, Algorithm 1)
against its own plain reading of the paper, written here in NumPy (float64) from the update equations:
every client's error e_i and estimate h_i, the server's decoded models and the averaged model over three
rounds, to 1e-6; eta -> 0 is EF21; client and server estimates agree bit for bit while clients sit out;
an end-to-end run trains with fewer bytes than the dense one; a kill -9 and ``fedsim resume`` end where the
run left alone does; the audit row says the server saw an estimate; a bad eta is one line naming
``upload.eta``."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, RecordDict

from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.scenario import parse_scenario
from strategies import Upload
from strategies.compression import CodecContext, get_codec
from strategies.compression.econtrol import STATE, EControlCodec, EControlParams
from strategies.records import to_record, to_torch
from tests.conftest import small_raw
from tests.test_resume import _killed
from tests.test_resume import _metrics as resumed_metrics

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"w": (24, 10), "b": (10,), "v": (10, 3)}  # three float layers (sign: one scale each) ...
SIZES = [math.prod(s) for s in SHAPES.values()]
D = sum(SIZES)


# ----------------------------------------------------------------------------- the paper, by hand


def ref_topk(x: np.ndarray, ratio: float) -> np.ndarray:
    """C: the k = ceil(ratio d) largest |x_j| kept, the rest zero."""
    k = max(1, min(x.size, math.ceil(ratio * x.size)))
    out = np.zeros_like(x)
    keep = np.argsort(-np.abs(x), kind="stable")[:k]
    out[keep] = x[keep]
    return out


def ref_sign(x: np.ndarray) -> np.ndarray:
    """C: per layer, mean|x| times the sign (0 counted as +)."""
    parts, start = [], 0
    for n in SIZES:
        layer = x[start:start + n]
        parts.append(np.where(layer >= 0, 1.0, -1.0) * np.abs(layer).mean())
        start += n
    return np.concatenate(parts)


class PaperEControl:
    """Algorithm 1 of the paper for n clients: e_i^0 = h_i^0 = 0, and each step
    Delta_i = C(eta e_i + g_i - h_i); e_i <- e_i + g_i - h_i - Delta_i; h_i <- h_i + Delta_i;
    the server's h = mean h_i and x <- x - gamma h (here the "gradient" is the update, gamma = -1)."""

    def __init__(self, n: int, d: int, eta: float, compress, x0: np.ndarray):
        self.e, self.h = np.zeros((n, d)), np.zeros((n, d))
        self.eta, self.compress, self.x = eta, compress, x0.copy()

    def step(self, g: np.ndarray) -> None:
        for i in range(len(g)):
            delta = self.compress(self.eta * self.e[i] + g[i] - self.h[i])
            self.e[i] = self.e[i] + g[i] - self.h[i] - delta
            self.h[i] = self.h[i] + delta
        self.x = self.x + self.h.mean(axis=0)


# ----------------------------------------------------------------------------- fedsim's codec against it


def _flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t[k].reshape(-1).float() for k in SHAPES])


def _model(flat: torch.Tensor, counter: int) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k, shape in SHAPES.items():
        n = math.prod(shape)
        out[k] = flat[start:start + n].view(shape).clone()
        start += n
    out["n"] = torch.tensor(counter, dtype=torch.int64)  # a non-float entry travels dense
    return out


def _local_step(sent: dict[str, torch.Tensor], client: int, rnd: int) -> dict[str, torch.Tensor]:
    """A client's local model: one gradient step on its own least-squares problem (heterogeneous clients)."""
    g = torch.Generator().manual_seed(1000 * client + 7)
    a, b = torch.randn(40, D, generator=g) / math.sqrt(D), torch.randn(40, generator=g) * (1 + client)
    x = _flat(sent)
    noise = torch.randn(D, generator=torch.Generator().manual_seed(rnd * 31 + client)) * 0.01
    return _model(x - 0.5 * (a.T @ (a @ x - b)) + noise, int(sent["n"]) + 1)


@pytest.mark.parametrize("inner,ratio,eta", [("topk", 0.1, 0.1), ("topk", 0.05, 0.5), ("sign", 0.01, 0.2)])
def test_econtrol_follows_the_papers_algorithm_1(inner, ratio, eta):
    n, rounds = 3, 3
    client_codec = get_codec("econtrol", {"inner": inner, "ratio": ratio, "eta": eta})
    server_codec = get_codec("econtrol", {"inner": inner, "ratio": ratio, "eta": eta})
    states = [RecordDict() for _ in range(n)]
    sent = _model(torch.randn(D, generator=torch.Generator().manual_seed(5)), 0)
    paper = PaperEControl(n, D, eta, (lambda x: ref_topk(x, ratio)) if inner == "topk" else ref_sign,
                          _flat(sent).double().numpy())
    for rnd in range(1, rounds + 1):
        uploads = [Upload(_local_step(sent, i, rnd), sent, {}) for i in range(n)]
        # the same inputs: g_i = the update fedsim's codec compresses (weights - sent, float32)
        paper.step(np.stack([(_flat(u.weights) - _flat(sent)).double().numpy() for u in uploads]))
        contents = []
        for i, up in enumerate(uploads):
            content = client_codec.encode(up, states[i], CodecContext(seed=3, server_round=rnd, client=i))
            content["fedsim"] = ConfigRecord({"partition-id": i})
            contents.append(content)
        decoded = server_codec.decode_round(contents, to_record(sent), CodecContext(seed=3, server_round=rnd))
        models = [to_torch(c["arrays"]) for c in decoded]
        for i in range(n):
            mem = to_torch(states[i][STATE])
            assert np.allclose(mem["e"].double().numpy(), paper.e[i], atol=1e-6, rtol=0), (rnd, i)
            assert np.allclose(mem["h"].double().numpy(), paper.h[i], atol=1e-6, rtol=0), (rnd, i)
            # the server decodes client i's reply to sent + h_i
            got = (_flat(models[i]) - _flat(sent)).double().numpy()
            assert np.allclose(got, paper.h[i], atol=1e-6, rtol=0), (rnd, i)
            assert int(models[i]["n"]) == rnd
        # FedAvg's plain mean of the decoded models is the paper's x <- x + mean h_i
        sent = _model(torch.stack([_flat(m) for m in models]).mean(0), rnd)
        assert np.allclose(_flat(sent).double().numpy(), paper.x, atol=1e-6, rtol=0), rnd
    assert np.abs(paper.e).max() > 1e-3  # the error term was there to feed back


def test_econtrol_at_eta_zero_is_ef21():
    """With no feedback (eta -> 0; the scenario asks for eta > 0) EControl's message is EF21's."""
    params = EControlParams.model_construct(inner="topk", ratio=0.1, eta=0.0)
    econtrol, ef21 = EControlCodec(params), get_codec("ef21", {"inner": "topk", "ratio": 0.1})
    s1, s2 = RecordDict(), RecordDict()
    sent = _model(torch.zeros(D), 0)
    for rnd in range(1, 4):
        up = Upload(_local_step(sent, 0, rnd), sent, {})
        ctx = CodecContext(seed=1, server_round=rnd)
        a, b = econtrol.encode(up, s1, ctx), ef21.encode(up, s2, ctx)
        assert all(torch.equal(to_torch(a["codec"])[k], to_torch(b["codec"])[k]) for k in to_torch(b["codec"]))
        assert torch.equal(to_torch(s1[STATE])["h"], to_torch(s2["codec-ef21"])["g"])


@pytest.mark.parametrize("inner", ["topk", "sign", "terngrad"])
def test_client_and_server_estimates_agree_and_survive_a_pickle(inner):
    """h_i on the client (Context.state) and on the server (the codec, pickled by checkpoints) stay equal bit
    for bit, also for a client that sits out a round and after the server's codec is pickled mid-run."""
    client_codec = get_codec("econtrol", {"inner": inner, "ratio": 0.05, "eta": 0.3})
    server_codec = get_codec("econtrol", {"inner": inner, "ratio": 0.05, "eta": 0.3})
    states = {0: RecordDict(), 1: RecordDict()}
    sent = _model(torch.zeros(D), 0)
    for rnd in range(1, 5):
        if rnd == 3:
            server_codec = pickle.loads(pickle.dumps(server_codec))
            states = {i: pickle.loads(pickle.dumps(s)) for i, s in states.items()}
        for client in ((0, 1) if rnd != 2 else (1,)):  # client 0 skips round 2
            up = Upload(_local_step(sent, client, rnd), sent, {})
            content = client_codec.encode(up, states[client], CodecContext(seed=1, server_round=rnd, client=client))
            content["fedsim"] = ConfigRecord({"partition-id": client})
            (decoded,) = server_codec.decode_round([content], to_record(sent), CodecContext(seed=1, server_round=rnd))
            h = to_torch(states[client][STATE])["h"]
            assert torch.equal(server_codec.estimates[client], h)
            assert torch.equal(_flat(to_torch(decoded["arrays"])), _flat(sent) + h)
    assert server_codec.support(content, to_record(sent)) is None


# ----------------------------------------------------------------------------- end to end


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_an_econtrol_run_trains_with_fewer_bytes_than_the_dense_run(tmp_path, one_torch_thread):
    settings = {"data__num_clients": 4, "train__rounds": 5}
    dense_out, econtrol_out = tmp_path / "dense", tmp_path / "econtrol"
    run_scenario(parse_scenario(small_raw(**settings)), dense_out, progress=False)
    upload = {"codec": "econtrol", "inner": "topk", "ratio": 0.1}
    summary = run_scenario(parse_scenario(small_raw(upload=upload, **settings)), econtrol_out, progress=False)
    assert summary["failures_total"] == 0
    dense, rows = _metrics(dense_out), _metrics(econtrol_out)
    assert [r["codec"] for r in rows] == ["econtrol"] * 5 and all(r["codec_direction"] == "up" for r in rows)
    for row, base in zip(rows, dense):
        assert math.isfinite(row["loss"]) and row["bytes_up"] < 0.25 * base["bytes_up"]
        assert row["bytes_down"] == base["bytes_down"]
    assert rows[-1]["accuracy"] > 0.5, rows[-1]["accuracy"]  # digits, 10 classes: chance is 0.1


def test_an_econtrol_run_killed_and_resumed_ends_as_the_run_left_alone(tmp_path):
    """Client e_i, h_i (Context.state, kept while a client sits out) and the server's h_i (the pickled codec)
    through a checkpoint: kill -9 after round 3, ``fedsim resume``, the same metrics as the run alone."""
    raw = small_raw(upload={"codec": "econtrol", "inner": "topk", "ratio": 0.1, "eta": 0.5}, train__rounds=12,
                    train__participation=0.5)
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    out = _killed(raw, tmp_path, rows=3)
    resumed = subprocess.run([sys.executable, "-m", "fedsim", "resume", str(out), "--quiet"], cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed_metrics(out) == resumed_metrics(tmp_path / "alone")  # wall times left out


def test_the_audit_row_says_the_server_saw_an_estimate(tmp_path, monkeypatch, one_torch_thread):
    """The audit attacks the decoded reply sent + h_i, not this round's update: the row says so (``audit_view``)."""
    from concurrent.futures import ThreadPoolExecutor

    from fedsim.engines import inline

    monkeypatch.setattr(inline.InlineGrid, "audit_executor", lambda self: ThreadPoolExecutor(max_workers=1),
                        raising=False)
    raw = small_raw(data__num_clients=100, train__batch_size=16, train__rounds=1, train__participation=0.03,
                    upload={"codec": "econtrol", "ratio": 0.1},
                    audit={"attack": "ig", "clients": 1, "attack_config": {"iterations": 3}})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    (row,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert row["exact_replay"] is False and row["support"] is None
    assert "econtrol: the server's estimate sent + h_i" in row["note"], row["note"]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("eta,needle", [(0, "upload.eta"), (-0.5, "upload.eta"), ("strong", "upload.eta")])
def test_a_bad_eta_is_one_line_naming_the_key(tmp_path, capsys, eta, needle):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(upload={"codec": "econtrol", "inner": "topk", "eta": eta})))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error:") and needle in err, err


def test_econtrol_settings_resolve_with_their_defaults():
    s = parse_scenario(small_raw(upload={"codec": "econtrol"}))
    assert s.upload == {"codec": "econtrol", "inner": "topk", "ratio": 0.01, "eta": 0.1}
    assert parse_scenario(yaml.safe_load(s.to_yaml())).upload == s.upload
