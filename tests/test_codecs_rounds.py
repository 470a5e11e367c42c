"""Every upload codec with every strategy in a short inline run; the bytes that travelled; the
``upload`` section's validation (one line naming the key, exit 2)."""

from __future__ import annotations

import math

import pytest
import yaml

from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario
from strategies import strategy_names
from strategies.compression import codec_names
from tests.conftest import small_raw

CODECS = [c for c in codec_names() if c != "none"]
STRATEGIES = ["fedavg", "fedprox", "scaffold", "fedspeed", "fedce", "fedimpro", "fedadam", "fedmedian", "qfedavg"]
RATIO = 0.05


def _upload(codec: str) -> dict | str:
    if codec == "none":
        return "none"
    return {"codec": codec, **({"ratio": RATIO} if codec in ("topk", "dgc", "sketch", "countsketch", "ef21", "econtrol")
                              else {})}


def _run(tmp_path, codec: str, strategy: str, **kw) -> list[dict]:
    settings = {"data__num_clients": 3, "train__rounds": 2, "train__participation": 2 / 3, **kw}
    raw = small_raw(upload=_upload(codec), strategy={"name": strategy}, **settings)
    out = tmp_path / f"{codec}-{strategy}"
    summary = run_scenario(parse_scenario(raw), out, progress=False)
    assert summary["failures_total"] == 0
    return read_metrics(out)


def test_the_strategies_list_is_complete():
    assert set(STRATEGIES) <= set(strategy_names())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_codec_composes_with_the_strategy(tmp_path, one_torch_thread, strategy):
    dense = _run(tmp_path, "none", strategy)
    for codec in CODECS:
        rows = _run(tmp_path, codec, strategy)
        for row, base in zip(rows, dense):
            assert math.isfinite(row["loss"]) and row["codec"] == codec and row["codec_direction"] == "up"
            assert row["bytes_down"] == base["bytes_down"]  # the downlink stays dense
            assert row["bytes_up"] < base["bytes_up"], (codec, strategy)
        assert rows[-1]["accuracy"] > 0.1, (codec, strategy)  # digits: 10 classes


def test_upload_bytes_are_what_travelled(tmp_path, one_torch_thread):
    """FedAvg on the MLP (64-32-10: d = 2410 values, 4 arrays): two clients a round. Dense: d fp32 plus
    four .npy headers; top-k and dgc: k values + k int32 indices; sign: d bits + per-layer scales;
    terngrad: 2 bits a value; sketch: m fp32; countsketch: rows x cols fp32."""
    d, header = 2410, 128 + 1  # numpy's .npy header (128 bytes here) and Flower's per-array key overhead
    rows = {c: _run(tmp_path, c, "fedavg")[0]["bytes_up"] / 2 for c in ["none", *CODECS]}
    k = math.ceil(RATIO * d)
    expected = {"none": 4 * d, "topk": 8 * k, "dgc": 8 * k, "ef21": 8 * k, "econtrol": 8 * k, "sign": d / 8 + 16,
                "terngrad": d / 4 + 16, "sketch": 4 * k, "countsketch": 4 * 5 * math.ceil(RATIO * d / 5)}
    for codec, per_client in rows.items():
        payload = expected[codec]
        assert payload <= per_client <= payload + 4 * header + 64, (codec, per_client, payload)
    assert rows["topk"] / rows["none"] < 3 * RATIO  # 2 * ratio plus headers


def test_runs_with_client_side_codec_state_are_reproducible(tmp_path, one_torch_thread):
    """DGC's residuals and EF21's estimates (Context.state, kept while a client sits out a round) and the
    seeded randomness give the same numbers on a rerun."""
    for codec in ("dgc", "ef21"):
        a = _run(tmp_path / "a", codec, "fedavg", train__rounds=3)
        b = _run(tmp_path / "b", codec, "fedavg", train__rounds=3)
        assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_sketch_and_noise_reports_its_dp_statement(tmp_path, one_torch_thread):
    raw = small_raw(upload={"codec": "sketch", "ratio": 0.2, "noise": 1.0, "clip_norm": 0.5, "delta": 1e-4},
                    data__num_clients=3, train__rounds=2)
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert 0 < rows[0]["codec_epsilon"] < rows[1]["codec_epsilon"] and rows[1]["codec_delta"] == 1e-4


BAD = [
    ({"upload": {"codec": "zip"}}, "upload.codec: unknown upload codec 'zip'"),
    ({"upload": {"codec": "topk", "ratio": 0}}, "upload.ratio"),
    ({"upload": {"codec": "topk", "ratio": 1.5}}, "upload.ratio"),
    ({"upload": {"codec": "topk", "rate": 0.1}}, "upload.rate: unknown key for topk; allowed: codec, ratio"),
    ({"upload": {"codec": "dgc", "values": "int8"}}, "upload.values"),
    ({"upload": {"codec": "sketch", "noise": 1.0}}, "clip_norm"),
    ({"upload": {"codec": "ef21", "inner": "dgc"}}, "upload.inner"),
    ({"upload": "topk"}, "upload"),
    ({"upload": {"codec": "topk"}, "defense": {"name": "dp_user", "clipping": "client"}}, "upload.codec"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[n for _, n in BAD])
def test_bad_upload_section_exit_2_one_line(tmp_path, capsys, overrides, needle):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(**overrides)))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error:") and needle in err, err


def test_upload_section_resolves_with_its_defaults():
    s = parse_scenario(small_raw(upload={"codec": "dgc", "ratio": 0.1}))
    assert s.upload["codec"] == "dgc" and s.upload["ratio"] == 0.1 and s.upload["momentum"] == 0.0
    assert parse_scenario(yaml.safe_load(s.to_yaml())).upload == s.upload
    assert parse_scenario(small_raw(upload={"codec": "none"})).upload == "none"


def test_the_round_record_gives_an_auditor_the_coordinates_sent():
    """What an audit of top-k/DGC uploads needs: the mask of coordinates each reply carried."""
    import torch
    from flwr.app import ConfigRecord, RecordDict

    from fedsim.run.rounds import NodeRound, RoundRecord, _decode_replies
    from strategies import Upload
    from strategies.compression import CodecContext, get_codec
    from strategies.records import to_record

    sent = {"w": torch.zeros(10, 10)}
    weights = {"w": torch.arange(100.0).view(10, 10)}
    codec = get_codec("topk", {"ratio": 0.05})
    wire = codec.encode(Upload(weights, sent, {}), RecordDict(), CodecContext())
    node = NodeRound(1, RecordDict({"config": ConfigRecord({"codec-seed": 0})}), reply=wire, wire=wire)
    _decode_replies([node], codec, to_record(sent), 1)
    record = RoundRecord(1, to_record(sent), [node], to_record(sent), {}, 0, 0, 0.0, codec=codec)
    mask = record.support(node)["w"]
    assert mask.sum() == 5 and mask.reshape(-1)[95:].all()
    assert (node.reply["arrays"]["w"].numpy() != 0).sum() == 5


def test_a_codec_composes_with_server_side_dp(tmp_path, one_torch_thread):
    """Flower's server-side clipping and noise act on the decoded models, after the codec."""
    dp = {"name": "dp_user", "clipping": "server", "noise_multiplier": 0.5, "clipping_norm": 1.0}
    raw = small_raw(upload={"codec": "topk", "ratio": 0.1}, defense=dp, data__num_clients=3, train__rounds=2)
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert summary["failures_total"] == 0 and rows[-1]["epsilon"] > 0 and rows[-1]["codec"] == "topk"
