"""The per-round privacy audit: it attacks exactly the configured rounds and clients, changes
nothing of training, and recovers an undefended batch-1 gradient."""

import json
import subprocess
import sys

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.audit import answer_gradient_query, batch_gradient, choose_targets, query_batch
from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import AuditConfig, ScenarioError, parse_scenario
from fedsim.world import world_from_text
from strategies.records import to_record, to_torch
from tests.conftest import small_raw

TRAINING = ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "participants", "failures")


def _lenet(**kw):
    settings = {"model": {"name": "lenet", "init": "uniform"}, "data__image_size": 16, "data__num_clients": 40,
                "train__batch_size": 4, **kw}
    return small_raw(**settings)


def _audit_rows(out):
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_gradient_audit_recovers_an_undefended_image_and_leaves_training_alone(tmp_path):
    raw = _lenet(train__rounds=2)
    run_scenario(parse_scenario(raw), tmp_path / "off", progress=False)
    raw["audit"] = {"threat": "gradient", "batch_size": 1, "clients": [3, 17]}
    summary = run_scenario(parse_scenario(raw), tmp_path / "on", progress=False)
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert [[r[k] for k in TRAINING] for r in on] == [[r[k] for k in TRAINING] for r in off]
    rows = _audit_rows(tmp_path / "on")
    assert [(r["round"], r["client"]) for r in rows] == [(1, 3), (1, 17), (2, 3), (2, 17)]
    for r in rows:
        assert r["attack"] == "idlg" and r["threat"] == "gradient" and r["images"] == 1
        assert r["psnr"] >= 30 and r["label_accuracy"] == 1.0
        assert (tmp_path / "on" / "audit" / r["reconstruction"]).stat().st_size > 100
    assert summary["audit_worst_psnr"] == max(r["psnr"] for r in rows)
    assert summary["audit_worst_cw_ssim"] == max(r["cw_ssim"] for r in rows) > 0.9  # breaching's CW-SSIM
    assert summary["audits"] == 4


@pytest.mark.fast  # the fast set's audit (tests/conftest.py): one short attack, in its spawned process as in a run
def test_a_one_round_audit_writes_its_row_and_reconstruction(tmp_path):
    raw = _lenet(train__rounds=1, audit={"threat": "gradient", "batch_size": 1, "clients": [3], "attack": "idlg",
                                         "attack_config": {"steps": 5}})
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    (row,) = _audit_rows(tmp_path)
    assert (row["round"], row["client"], row["attack"], row["threat"]) == (1, 3, "idlg", "gradient")
    assert row["psnr"] is not None and (tmp_path / "audit" / row["reconstruction"]).stat().st_size > 100
    assert summary["audits"] == 1


def test_update_audit_attacks_the_configured_rounds_and_leaves_training_alone(tmp_path):
    raw = _lenet(train__rounds=5, data__num_clients=300, train__participation=0.02)
    run_scenario(parse_scenario(raw), tmp_path / "off", progress=False)
    raw["audit"] = {"attack": "ig", "every": 2, "clients": 1, "attack_config": {"iterations": 20}}
    run_scenario(parse_scenario(raw), tmp_path / "on", progress=False)
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert [[r[k] for k in TRAINING] for r in on] == [[r[k] for k in TRAINING] for r in off]
    rows = _audit_rows(tmp_path / "on")
    assert [r["round"] for r in rows] == [2, 4, 5]  # every 2nd round, and the last
    for r in rows:
        assert r["threat"] == "update" and r["exact_replay"] is True and r["iterations"] <= 20
        assert r["images"] >= 1 and 0 <= r["ssim"] <= 1


def test_the_gradient_query_answers_the_auditors_batch_and_touches_no_client_state():
    text = parse_scenario(_lenet()).to_yaml()
    world = world_from_text(text)
    model = world.new_model()
    x, y = world.client_tensors(5)[:2]
    content = RecordDict({"arrays": to_record(model.state_dict()),
                          "config": ConfigRecord({"server-round": 3, "seed": 0, "audit-batch-size": 2})})
    before = torch.random.get_rng_state()
    reply = answer_gradient_query(content, world.new_model(), x, y, partition_id=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # no training stream moved
    assert list(reply.array_records) == ["gradients"] and reply["fedsim"]["partition-id"] == 5
    idx = torch.from_numpy(query_batch(len(y), 2, 0, 3, 5))
    assert len(idx) == 2
    got = to_torch(reply["gradients"])
    # The auditor's replay of the target's batch (no dropout in this LeNet) gives the same gradient.
    expected = batch_gradient(model, x[idx], y[idx], seed=0)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_targets_are_seeded_and_lists_are_kept():
    audit = AuditConfig(clients=2)
    a = choose_targets(audit, list(range(10)), seed=0, server_round=3)
    assert a == choose_targets(audit, list(range(10)), seed=0, server_round=3) and len(a) == 2
    assert choose_targets(AuditConfig(clients=[4, 7]), [1, 4, 9], seed=0, server_round=1) == [4]


@pytest.mark.parametrize("audit,message", [
    ({"attack": "nope"}, r"^audit\.attack: unknown attack 'nope'"),
    ({"clients": [0, 99]}, r"^audit\.clients: partition id 99 does not exist"),
    ({"every": 0}, r"^audit\.every: "),
    ({"attack": "sme", "threat": "gradient"}, r"^audit\.threat: sme attacks update"),
    ({"attack": "ig", "attack_config": {"bogus": 1}}, r"^audit\.attack_config: .*bogus"),
    ({"treat": "update"}, r"^audit\.treat: unknown key"),
])
def test_bad_audit_blocks_name_the_key(audit, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(small_raw(audit=audit))


def test_bad_audit_block_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("audit: {attack: dlg, every: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "fedsim", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "audit.every" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_audit_on_the_ray_engine_equals_inline(tmp_path, local_ray):
    raw = _lenet(train__rounds=2, audit={"threat": "gradient", "batch_size": 1, "clients": [3]})
    run_scenario(parse_scenario(raw), tmp_path / "inline", progress=False)
    raw["engine"] = {"name": "ray", "ray": {"num_actors": 2}}
    run_scenario(parse_scenario(raw), tmp_path / "ray", progress=False)
    a, b = read_metrics(tmp_path / "inline"), read_metrics(tmp_path / "ray")
    assert [[r[k] for k in TRAINING] for r in a] == [[r[k] for k in TRAINING] for r in b]
    keys = ("round", "client", "attack", "psnr", "ssim", "label_accuracy")
    assert [[r[k] for k in keys] for r in _audit_rows(tmp_path / "inline")] == \
        [[r[k] for k in keys] for r in _audit_rows(tmp_path / "ray")]


def test_the_gradient_threat_sends_exactly_one_query_to_each_target(tmp_path, monkeypatch):
    from fedsim.engines import inline

    sent = []
    push = inline.InlineGrid.push_messages

    def counting(self, messages):
        messages = list(messages)
        sent.extend((m.metadata.message_type, m.metadata.dst_node_id) for m in messages)
        return push(self, messages)

    monkeypatch.setattr(inline.InlineGrid, "push_messages", counting)
    raw = _lenet(train__rounds=2, audit={"threat": "gradient", "batch_size": 1, "clients": [3, 17]})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    queries = [node for kind, node in sent if kind.startswith("query")]
    assert queries == [1003, 1017, 1003, 1017]  # one per target per audited round
    assert sum(kind == "train" for kind, _ in sent) == 2 * 40
