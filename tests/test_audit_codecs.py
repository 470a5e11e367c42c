"""The audit through the upload codecs (issue 11, item 3): against top-k/DGC the attack matches only the
coordinates the reply carried; every codec's upload is audited, and the row says what the attack saw."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attacks import Observation, build_attack
from attacks.label_recovery import _unsent_bias_but_negative_row, batch_labels
from attacks.objective import cosine_distance, squared_l2
from fedsim.engines import inline, run_scenario
from fedsim.scenario import parse_scenario
from strategies.compression import codec_names
from tests.conftest import small_raw

RATIO = {"topk": 0.1, "dgc": 0.1, "ef21": 0.1, "sketch": 0.2, "countsketch": 0.2}


@pytest.fixture
def audit_in_a_thread(monkeypatch, one_torch_thread):
    """The audit's attacks in a thread of this process: no spawned worker to start per run (seconds each)."""
    monkeypatch.setattr(inline.InlineGrid, "audit_executor", lambda self: ThreadPoolExecutor(max_workers=1),
                        raising=False)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def _one_client_audit(out, upload: dict, **audit) -> dict:
    """Round 1 of sigmoid LeNet on 16x16 digits, 4 samples a client, one client's upload through
    ``upload`` attacked by unrolled IG (200 iterations); its one audit row."""
    raw = small_raw(model={"name": "lenet", "init": "uniform"}, data__image_size=16, data__num_clients=359,
                    data__val_fraction=0.0, train__batch_size=4, train__rounds=1, train__participation=0.01,
                    train__lr=0.3, upload=upload,
                    audit={"attack": "ig", "clients": 1, "attack_config": {"iterations": 200}, **audit})
    run_scenario(parse_scenario(raw), out, progress=False)
    (row,) = _rows(out)
    return row


def _upload(codec: str):
    if codec == "none":
        return "none"
    return {"codec": codec, **({"ratio": RATIO[codec]} if codec in RATIO else {})}


def test_losses_under_a_support_see_only_its_coordinates():
    a = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0, -1.0]])]
    b = [torch.tensor([1.0, 0.0, 3.0]), torch.tensor([[4.0, 0.0]])]  # b is a with unsent coordinates zeroed
    support = [torch.tensor([True, False, True]), torch.tensor([[True, False]])]
    assert float(squared_l2(a, b, support)) == 0.0 and float(squared_l2(a, b)) == 5.0
    assert abs(float(cosine_distance(a, b, support))) < 1e-6 and float(cosine_distance(a, b)) > 0.05


def test_the_observation_validates_its_support():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    upload = [torch.zeros(3, 4), torch.zeros(3)]
    ok = [torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    kw = dict(lr=0.1, local_steps=1, input_shape=(1, 2, 2), num_classes=3, num_samples=2)
    obs = Observation.from_update(model, upload, support=ok, **kw)
    assert obs.support_fraction() == 12 / 15
    named = Observation.from_update(model, upload, support={"1.weight": ok[0], "1.bias": ok[1], "extra": 0}, **kw)
    assert torch.equal(named.support[0], ok[0])
    for bad, message in [([ok[0].float(), ok[1]], "bool mask"), ([ok[0][:2], ok[1]], "shape"),
                         ([ok[0]], "1 masks"), ([~ok[0], ok[1]], "no coordinate")]:
        with pytest.raises(ValueError, match=message):
            Observation.from_update(model, upload, support=bad, **kw)
    project = lambda flat: flat[:5] * 2.0  # noqa: E731 - a linear map to a 5-value wire
    assert Observation.from_update(model, upload, wire=torch.zeros(5), wire_map=project, **kw).wire.shape == (5,)
    for extra, message in [({"wire": torch.zeros(5)}, "go together"), ({"wire": torch.zeros(4), "wire_map": project},
                           "output shape"), ({"wire": torch.zeros(5), "wire_map": project, "support": ok}, "not both")]:
        with pytest.raises(ValueError, match=message):
            Observation.from_update(model, upload, **extra, **kw)


def test_label_recovery_under_a_support_reads_negative_rows_where_the_bias_was_not_sent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 5))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([1, 3, 4])
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    support = [torch.ones_like(g, dtype=torch.bool) for g in grads]
    support[3] = torch.tensor([True, True, True, False, True])  # class 3's bias entry did not travel
    masked = [g * m for g, m in zip(grads, support)]
    obs = Observation.from_gradients(model, masked, input_shape=(1, 2, 2), num_classes=5, batch_size=3,
                                     support=support)
    assert batch_labels(obs).tolist() == [1, 3, 4]
    # class 3 is present on the evidence of its weight row (the bias entry is no evidence: it did not travel)
    assert _unsent_bias_but_negative_row(obs, masked[2]).tolist() == [3]
    blind = Observation.from_gradients(model, masked, input_shape=(1, 2, 2), num_classes=5, batch_size=3)
    assert _unsent_bias_but_negative_row(blind, masked[2]) is None


def test_a_topk_upload_audited_on_its_support_beats_the_same_audit_on_the_decoded_zeros(tmp_path, audit_in_a_thread):
    """Sigmoid LeNet, digits 16x16, 4 samples a client, one local step; top-k keeps 10% of the update; unrolled
    IG, 200 iterations, on the same client's same upload with and without the support."""
    psnr = {}
    for support in (True, False):
        row = _one_client_audit(tmp_path / str(support), {"codec": "topk", "ratio": 0.1}, support=support)
        psnr[support] = row["psnr"]
        if support:
            assert row["support"] == pytest.approx(0.1, abs=1e-3) and "10% of coordinates" in row["note"]
        else:
            assert row["support"] is None and "audit.support: false" in row["note"]
    assert psnr[True] > psnr[False] + 1.5, psnr


def test_a_sketched_upload_matched_in_sketch_space_beats_the_de_sketch(tmp_path, audit_in_a_thread):
    """Same case as above, a sketch of half the update's size: the attack sketches its simulated update with the
    round's S (the server knows the seed) and matches the y that travelled, against matching the de-sketch S^T y."""
    psnr = {}
    for space in (True, False):
        row = _one_client_audit(tmp_path / str(space), {"codec": "sketch", "ratio": 0.5}, sketch_space=space)
        psnr[space] = row["psnr"]
        assert ("sketch space" if space else "de-sketch") in row["note"]
    assert psnr[True] > psnr[False] + 4, psnr


def test_the_sketch_map_is_the_codecs_sketch_and_differentiable():
    import pickle

    from strategies.compression.sketch import SketchMap
    from strategies.compression.sketch import SparseJL

    x = torch.randn(1000, requires_grad=True)
    for blocks in (1, 3):
        sketch = pickle.loads(pickle.dumps(SketchMap(7, 1000, 300, blocks)))
        assert torch.allclose(sketch(x), SparseJL(7, 1000, 300, blocks).apply(x.detach()), atol=1e-5)
        (g,) = torch.autograd.grad(sketch(x).pow(2).sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_the_audit_runs_through_every_codec(tmp_path, audit_in_a_thread):
    seen = {}
    for codec in codec_names():
        raw = small_raw(data__num_clients=100, train__batch_size=16, train__rounds=1, train__participation=0.03,
                        upload=_upload(codec), audit={"attack": "ig", "clients": 1, "attack_config": {"iterations": 3}})
        run_scenario(parse_scenario(raw), tmp_path / codec, progress=False)
        (row,) = _rows(tmp_path / codec)
        assert row["threat"] == "update" and row["iterations"] >= 1 and row["psnr"] is not None, codec
        seen[codec] = row
    for codec, row in seen.items():
        if codec in ("topk", "dgc"):
            assert 0 < row["support"] <= 2 * RATIO[codec] and "coordinates the reply carried" in row["note"], codec
        else:
            assert row["support"] is None, codec
    assert seen["none"]["i2f_psnr"] is None and seen["topk"]["i2f_psnr"] is not None
    assert "sketch space" in seen["sketch"]["note"] and "decoded values" in seen["terngrad"]["note"]
    assert "aggregate" in seen["countsketch"]["note"] and seen["countsketch"]["exact_replay"] is False
    assert seen["none"]["exact_replay"] is True and seen["topk"]["exact_replay"] is True


def test_the_audit_attack_reads_the_support_it_was_given():
    """The attack object itself: the same sparse upload with and without a support gives different objectives."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    upload = [torch.randn(3, 4), torch.randn(3)]
    support = [torch.rand(3, 4) > 0.5, torch.ones(3, dtype=torch.bool)]
    kw = dict(lr=0.1, local_steps=1, input_shape=(1, 2, 2), num_classes=3, num_samples=1, labels=[0])
    on = build_attack("ig", iterations=3, seed=0).reconstruct(Observation.from_update(model, upload, support=support, **kw))
    off = build_attack("ig", iterations=3, seed=0).reconstruct(Observation.from_update(model, upload, **kw))
    assert on.loss_trace[0] != off.loss_trace[0]


def test_the_sketch_decodes_to_its_de_sketch_with_the_shared_seed_and_terngrad_to_its_ternary_values():
    """What the audit attacks through these codecs (fedsim/audit/): the decoded upload is, for a sketch, S^T y
    with S drawn from the round's shared seed (the server's to know), and for TernGrad scale * {-1, 0, 1}."""
    from flwr.app import RecordDict

    from strategies.compression import CodecContext, get_codec
    from strategies.compression.sketch import ROUND_STREAM, SparseJL
    from strategies.records import to_record, to_torch
    from strategies.upload import Upload

    torch.manual_seed(0)
    sent = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    weights = {k: v + 0.1 * torch.randn_like(v) for k, v in sent.items()}
    delta = torch.cat([(weights[k] - sent[k]).reshape(-1) for k in sent])
    ctx = CodecContext(seed=3, server_round=2, client=1)
    for name, params in (("sketch", {"ratio": 0.5}), ("terngrad", {})):
        codec = get_codec(name, params)
        content = codec.encode(Upload(weights, sent, {}), RecordDict(), ctx)
        decoded = to_torch(codec.decode(content, to_record(sent), ctx)["arrays"])
        got = torch.cat([(decoded[k] - sent[k]).reshape(-1) for k in sent])
        if name == "sketch":
            jl = SparseJL(ctx.round_seed(ROUND_STREAM), delta.numel(), 18)
            assert torch.allclose(got, jl.transpose(jl.apply(delta)), atol=1e-6)
        else:
            for part, k in zip(torch.split(got, [sent[k].numel() for k in sent]), sent):
                scale = part.abs().max()
                assert set((part / scale).round().tolist()) <= {-1.0, 0.0, 1.0}
                assert torch.allclose(part.abs()[part != 0], scale.expand(int((part != 0).sum())))
