"""Defenses inside FL rounds: DP-SGD's epsilon is Opacus's (and Google's dp-accounting's), the
defenses' noise reaches what a client sends, pruning keeps the stated fraction, every defense
composes with FedAvg, SCAFFOLD and the audit, and bad defense blocks are exit 2."""

import json
import logging
import math

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from defenses import build_defenses
from defenses.dp_sgd import steps_per_epoch
from defenses.prune import prune
from fedsim.cli import main
from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world import world_from_text
from strategies import ServerSettings, client_config
from strategies.records import to_record, to_torch
from tests.conftest import small_raw


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ----------------------------------------------------------------------------- one client, one message


def _train_once(defense, scenario_raw=None, partition_id=0, state=None, server_round=1):
    """One ClientApp training call with the defense settings the server would send; returns
    (sent state dict, uploaded state dict, reply metrics)."""
    from fedsim.run.apps import client_app
    from fedsim.engines.identity import enter_server_identity

    scenario = parse_scenario(scenario_raw or small_raw())
    text = scenario.to_yaml()
    model = world_from_text(text).new_model()
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    _, extra = build_defenses(parse_scenario({**small_raw(), "defense": defense}).defenses(), 4, 4, 0, 2)
    t = scenario.train
    settings = ServerSettings(seed=scenario.seed, num_clients=scenario.data.num_clients, lr=t.lr,
                              batch_size=t.batch_size, local_epochs=t.local_epochs)
    enter_server_identity(1)
    config = ConfigRecord({**extra, **client_config(settings, server_round)})
    msg = Message(RecordDict({"arrays": to_record(sent), "config": config}), 1000, MessageType.TRAIN, group_id="1")
    msg.metadata.__dict__["_message_id"] = "m"
    context = Context(run_id=1, node_id=1000, node_config={"partition-id": partition_id, "num-partitions": 4},
                      state=state if state is not None else RecordDict(), run_config={"scenario-yaml": text})
    reply = client_app(msg, context).content
    return sent, to_torch(reply["arrays"]), dict(reply["metrics"])


def _update(sent, up):
    return torch.cat([(up[k].double() - sent[k].double()).ravel() for k in sent])


@pytest.mark.parametrize("distribution,kurtosis", [("gaussian", 3.0), ("laplace", 6.0)])
def test_upload_noise_has_the_stated_variance(distribution, kurtosis):
    sent, plain, _ = _train_once("none")
    _, noisy, _ = _train_once({"name": "noise", "variance": 1e-2, "distribution": distribution})
    diff = _update(plain, noisy)  # same seeds: only the defense's noise differs
    assert len(diff) > 2000
    assert diff.var().item() == pytest.approx(1e-2, rel=0.1)
    assert abs(diff.mean().item()) < 0.01
    z = (diff - diff.mean()) / diff.std()
    assert (z ** 4).mean().item() == pytest.approx(kurtosis, rel=0.3)  # Gaussian 3, Laplace 6


def test_dp_sgd_noise_reaches_the_upload_with_opacus_variance():
    """Huge noise, plain SGD: the update is sum over steps of -lr * noise / expected batch, so its
    per-entry variance is steps * (lr * sigma * C / E[B])^2; the data's clipped part is negligible."""
    sigma, clip, raw = 200.0, 1.0, small_raw(train__lr=0.01)
    sent, up, metrics = _train_once({"name": "dp_sgd", "noise_multiplier": sigma, "max_grad_norm": clip}, raw)
    n = int(metrics["num-examples"])
    k = steps_per_epoch(n, 32)
    expected = k * (0.01 * sigma * clip / int(n * (1 / k))) ** 2
    assert metrics["local_steps"] == k
    assert _update(sent, up).var().item() == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("mode", ["ew", "hooks", "ghost"])
def test_dp_sgd_round_is_opacus_dp_optimizer_bit_for_bit(mode):
    """fedsim adds only the batches and the seeds: the same Poisson batches and noise generator through
    Opacus's own GradSampleModule + DPOptimizer give the same upload, bit for bit."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    from defenses.dp_sgd import DP_NOISE_STREAM, PoissonSampler
    from strategies.trainer import TrainSettings

    sent, up, metrics = _train_once({"name": "dp_sgd", "noise_multiplier": 1.3, "max_grad_norm": 0.5,
                                     "grad_sample_mode": mode})
    assert 0 < metrics["dp-clip-fraction"] <= 1

    world = world_from_text(parse_scenario(small_raw()).to_yaml())
    model = world.new_model()
    x, y = world.client_tensors(0)[:2]
    settings = TrainSettings.from_config(ConfigRecord(client_config(ServerSettings(seed=0, num_clients=4, lr=0.1), 1)), 0)
    k = steps_per_epoch(len(y), 32)
    torch.default_generator.manual_seed(settings.seed)
    noise = torch.Generator().manual_seed(int(np.random.default_rng([settings.seed, DP_NOISE_STREAM]).integers(2**62)))
    dp = dict(noise_multiplier=1.3, max_grad_norm=0.5, expected_batch_size=int(len(y) * (1 / k)), generator=noise)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "ghost":  # Opacus's fast gradient clipping, wired as PrivacyEngine.make_private wires it
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=0.5)
        opt = DPOptimizerFastGradientClipping(sgd, **dp)
        criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(), loss_reduction="mean")
    else:
        gsm = wrap_model(model, mode, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(sgd, **dp)
        criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for idx in PoissonSampler().schedule(len(y), settings):
        assert len(idx)  # (batch 32: no empty batch here, so no fedsim special case is exercised)
        opt.zero_grad(set_to_none=True)
        criterion(gsm(x[idx]), y[idx]).backward()
        opt.step()
    gsm._close()
    assert all(torch.equal(model.state_dict()[k_], up[k_]) for k_ in up)
    assert not all(torch.equal(sent[k_], up[k_]) for k_ in up)


@pytest.mark.parametrize("mode", ["ew", "hooks", "ghost"])
def test_dp_sgd_clips_with_opacus_own_methods_and_counts_what_they_clip(monkeypatch, mode):
    """fedsim keeps no copy of Opacus's clipping: every training step runs Opacus's own
    DPOptimizer.clip_and_accumulate (ghost: the module's get_clipping_coef), and so does the audit's
    gradient query, seen through spies on the Opacus classes themselves, which a copy would bypass.
    The reported clip fraction is the share of per-sample gradients whose norm exceeds
    max_grad_norm, and the audit's answer is Opacus's DPOptimizer's, bit for bit."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    from defenses.dp_sgd import private_gradient

    calls, over, seen = {"clip": 0, "coef": 0}, [0], [0]

    def count(norms, bound):
        over[0] += int((norms > bound).sum())
        seen[0] += len(norms)

    clip_and_accumulate = DPOptimizer.clip_and_accumulate
    get_clipping_coef = GradSampleModuleFastGradientClipping.get_clipping_coef

    def spy_clip(self):
        calls["clip"] += 1
        if len(self.grad_samples[0]):
            count(torch.cat([g.reshape(len(g), -1) for g in self.grad_samples], 1).norm(dim=1), self.max_grad_norm)
        clip_and_accumulate(self)

    def spy_coef(self):
        calls["coef"] += 1
        coef = get_clipping_coef(self)
        count(self.per_sample_gradient_norms, self.max_grad_norm)
        return coef

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy_clip)
    monkeypatch.setattr(GradSampleModuleFastGradientClipping, "get_clipping_coef", spy_coef)
    block = {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 2.0, "grad_sample_mode": mode}
    _, _, metrics = _train_once(block)
    assert calls["coef" if mode == "ghost" else "clip"] == metrics["local_steps"] > 0
    assert 0 < metrics["dp-clip-fraction"] < 1
    assert metrics["dp-clip-fraction"] == over[0] / seen[0]

    world = world_from_text(parse_scenario(small_raw()).to_yaml())
    model = world.new_model()
    x, y = (t[:8] for t in world.client_tensors(0)[:2])
    calls["clip"] = 0
    answer = private_gradient(model, x, y, {**block, "rounds": 2}, 100, 32, 1, torch.Generator().manual_seed(5))
    assert calls["clip"] == 1  # ghost mode too: the query takes per-sample gradients by hooks
    gsm = wrap_model(model, "hooks" if mode == "ghost" else mode, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=2.0,
                      expected_batch_size=None, loss_reduction="sum", generator=torch.Generator().manual_seed(5))
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.step()  # clip, sum, noise; then an SGD step of lr 0: the weights stay
    expected = {name: prm.grad / len(y) for name, prm in model.named_parameters()}
    gsm.cleanup()
    assert all(torch.equal(answer[k], expected[k]) for k in expected)


def test_prune_zeroes_exactly_the_stated_fraction_of_each_layer():
    g = torch.Generator().manual_seed(0)
    update = {"w": torch.randn(37, 11, generator=g), "b": torch.tensor([0.5, -0.5, 0.5, 0.1, 0.0, -0.5, 2.0])}
    for ratio in (0.0, 0.3, 0.5, 0.9):
        out = prune(update, ratio)
        for k, v in update.items():
            zeroed = int((out[k] == 0).sum()) - int((v == 0).sum() if ratio == 0 else 0)
            assert zeroed == round(ratio * v.numel())
            kept = out[k] != 0
            assert torch.equal(out[k][kept], v[kept])  # survivors untouched
            if kept.any() and (~kept).any():
                assert v[~kept].abs().max() <= v[kept].abs().min()  # the smallest went
    sent, up, _ = _train_once({"name": "prune", "ratio": 0.7})
    for k in sent:
        d = up[k] - sent[k]
        assert int((d == 0).sum()) >= round(0.7 * d.numel())


def test_clip_bounds_the_update_and_reports_it():
    sent, up, metrics = _train_once({"name": "clip", "max_norm": 0.05})
    assert _update(sent, up).norm().item() <= 0.05 * (1 + 1e-5)
    assert metrics["defense-update-clipped"] == 1.0
    _, _, loose = _train_once({"name": "clip", "max_norm": 1e6})
    assert loose["defense-update-clipped"] == 0.0


def test_dp_sgd_leaves_no_opacus_hooks_on_the_shared_model():
    """The ClientApp reuses one model object per process: a private round must not leave Opacus's
    hooks behind for the next (maybe non-private) call."""
    from fedsim.run.apps import _models

    before = _train_once("none")
    _train_once({"name": "dp_sgd", "noise_multiplier": 1.0})
    for _, model in _models.values():
        for m in model.modules():
            assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
            assert not any(hasattr(p, "grad_sample") for p in m.parameters(recurse=False))
    after = _train_once("none")
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


# ----------------------------------------------------------------------------- accounting


def _dp_accounting_epsilon(q, sigma, steps, delta):
    logging.getLogger().setLevel(logging.ERROR)  # dp-accounting logs orders it skips
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_epsilon_is_opacus_accountant_and_agrees_with_dp_accounting(tmp_path):
    """Clients skip rounds (participation 0.5): each one's epsilon counts only the rounds it trained
    in (its accountant lives in Context.state), and the row's epsilon is the largest so far."""
    sigma, delta = 1.1, 1e-5
    raw = small_raw(train__rounds=3, train__participation=0.5,
                    defense={"name": "dp_sgd", "noise_multiplier": sigma, "max_grad_norm": 1.0, "delta": delta})
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    world = world_from_text(parse_scenario(raw).to_yaml())
    trained = {pid: 0 for pid in range(4)}
    largest = 0.0
    for r in rows:
        assert len(r["epsilon_clients"]) == r["participants"] == 2 and r["delta"] == delta
        for pid, eps in r["epsilon_clients"].items():
            pid = int(pid)
            trained[pid] += 1
            n = len(world.client_tensors(pid)[1])
            k = steps_per_epoch(n, 32)
            opacus = RDPAccountant()
            opacus.history = [(sigma, 1 / k, k * trained[pid])]
            assert eps == opacus.get_epsilon(delta)  # Opacus's own number
            assert eps == pytest.approx(_dp_accounting_epsilon(1 / k, sigma, k * trained[pid], delta), rel=2e-3)
            largest = max(largest, eps)
        assert r["epsilon"] == largest
        assert 0 <= r["clip_fraction"] <= 1
    assert max(trained.values()) >= 2  # someone's budget did accumulate over rounds
    assert summary["epsilon"] == rows[-1]["epsilon"] and summary["delta"] == delta


def test_target_epsilon_is_met_after_the_last_round(tmp_path):
    raw = small_raw(train__rounds=2, defense={"name": "dp_sgd", "target_epsilon": 3.0, "delta": 1e-5})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] <= 3.0
    assert rows[1]["epsilon"] == pytest.approx(3.0, rel=0.02)  # every client trained every round


# ----------------------------------------------------------------------------- composition


COMPOSE = [
    ("fedavg", [{"name": "clip", "max_norm": 1.0}, {"name": "prune", "ratio": 0.5}, {"name": "noise", "variance": 1e-4}]),
    ("fedavg", {"name": "dp_sgd", "noise_multiplier": 0.8}),
    ("scaffold", [{"name": "dp_sgd", "noise_multiplier": 0.8}, {"name": "noise", "variance": 1e-4}]),
    ("scaffold", [{"name": "prune", "ratio": 0.5}, {"name": "clip", "max_norm": 0.5}]),
    ("fedprox", {"name": "dp_sgd", "noise_multiplier": 0.8}),
    ("fedce", {"name": "dp_sgd", "noise_multiplier": 0.8}),
]


@pytest.mark.parametrize("strategy,defense", COMPOSE, ids=[f"{s}-{i}" for i, (s, _) in enumerate(COMPOSE)])
def test_defenses_compose_with_strategies_and_are_seeded(tmp_path, strategy, defense):
    strat = {"name": strategy, **({"mu": 0.1} if strategy == "fedprox" else {})}
    raw = small_raw(strategy=strat, train__rounds=2, train__participation=0.5, defense=defense)
    a = run_scenario(parse_scenario(raw), tmp_path / "a", progress=False)
    run_scenario(parse_scenario(raw), tmp_path / "b", progress=False)
    raw.pop("defense")
    run_scenario(parse_scenario(raw), tmp_path / "c", progress=False)
    ra, rb, rc = (read_metrics(tmp_path / x) for x in "abc")
    keys = ("accuracy", "loss", "train_loss")
    assert a["failures_total"] == 0
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]  # one seed, one run
    assert [r["loss"] for r in ra] != [r["loss"] for r in rc]  # the defense did something
    blocks = defense if isinstance(defense, list) else [defense]
    if any(b["name"] == "dp_sgd" for b in blocks):
        assert all(r["epsilon"] > 0 for r in ra)
    if any(b["name"] == "clip" for b in blocks):
        assert all(0 <= r["update_clip_fraction"] <= 1 for r in ra)


def _lenet_audit(defense, tmp_path, name):
    raw = small_raw(model={"name": "lenet", "init": "uniform"}, data__image_size=16, data__num_clients=40,
                    train__rounds=1,
                    audit={"threat": "gradient", "batch_size": 1, "clients": [3], "attack": "idlg",
                           "attack_config": {"steps": 15, "restarts": 1}})  # the noisy case never converges
    if defense:
        raw["defense"] = defense
    run_scenario(parse_scenario(raw), tmp_path / name, progress=False)
    return [json.loads(line) for line in (tmp_path / name / "audit.jsonl").read_text().splitlines()]


def test_audit_gradient_query_goes_through_the_defense(tmp_path):
    """The audit's gradient answer is defended like the upload: iDLG's PSNR drops under noise 1e-2."""
    plain = _lenet_audit(None, tmp_path, "plain")
    noisy = _lenet_audit({"name": "noise", "variance": 1e-2}, tmp_path, "noise")
    assert plain[0]["psnr"] >= 30
    assert noisy[0]["psnr"] < plain[0]["psnr"] - 10
    # I2F beside the attack: only for a perturbed upload, and it predicts the same collapse
    assert plain[0]["i2f_psnr"] is None
    assert noisy[0]["i2f_psnr"] is not None and noisy[0]["i2f_psnr"] < plain[0]["psnr"] - 10


def test_audit_gradient_query_under_dp_sgd_is_clipped_and_noised():
    """The gradient query under dp_sgd: per-sample clipped to C, noise of std sigma*C, over the batch."""
    from fedsim.audit import answer_gradient_query

    text = parse_scenario(small_raw()).to_yaml()
    world = world_from_text(text)
    model = world.new_model()
    x, y = world.client_tensors(0)[:2]
    _, extra = build_defenses(parse_scenario(small_raw(defense={"name": "dp_sgd", "noise_multiplier": 1e-6,
                                                                    "max_grad_norm": 1e-3})).defenses(), 4, 4, 0, 2)

    def ask(config):
        content = RecordDict({"arrays": to_record(model.state_dict()),
                              "config": ConfigRecord({"server-round": 1, "seed": 0, "audit-batch-size": 8,
                                                      "batch-size": 32, "local-epochs": 1, **config})})
        return torch.cat([g.ravel() for g in to_torch(answer_gradient_query(content, model, x, y, 0)["gradients"]).values()])

    plain, private = ask({}), ask(extra)
    assert plain.norm() > 1e-2  # a real gradient, far above the bound
    assert private.norm().item() <= 1e-3 * (1 + 1e-3)  # mean of 8 clipped per-sample gradients
    assert torch.nn.functional.cosine_similarity(plain, private, dim=0) > 0.5

    # The noise: std sigma * C / B per entry, sigma the one the client trains with (from target_epsilon
    # here: its training batch size and epochs, not the query's batch, decide it).
    block = {"name": "dp_sgd", "target_epsilon": 2.0, "max_grad_norm": 1e-3}
    _, extra = build_defenses(parse_scenario(small_raw(defense=block)).defenses(), 4, 4, 0, 2)
    sigma = _train_once(block)[2]["dp-noise-multiplier"]
    assert sigma > 1
    assert ask(extra).var().item() == pytest.approx((sigma * 1e-3 / 8) ** 2, rel=0.1)


# ----------------------------------------------------------------------------- validation


BAD = [
    ({"name": "dpsgd"}, "defense.name: unknown defense 'dpsgd'"),
    ({"name": "noise", "variance": -1}, "defense.variance"),
    ({"name": "prune", "ratio": 1.0}, "defense.ratio"),
    ({"name": "clip", "max_norm": 0}, "defense.max_norm"),
    ({"name": "dp_sgd"}, "exactly one of noise_multiplier and target_epsilon"),
    ({"name": "dp_sgd", "noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one"),
    ({"name": "dp_sgd", "noise_multiplier": 1.0, "delta": 2}, "defense.delta"),
    ({"name": "dp_sgd", "noise_multiplier": 1.0, "accountant": "moments"}, "defense.accountant"),
    ([{"name": "clip"}, {"name": "noise", "bogus": 1}], "defense.1.bogus"),
    ([{"name": "clip"}, {"name": "clip"}], "at most once"),
    ("noise", "defense.name"),
    ([{"name": "dp_sgd", "noise_multiplier": 1.0}, {"name": "dp_user"}], "use one of them"),
    ({"name": "dp_user", "adaptive": True, "noise_multiplier": 1.0}, "defense.noise_multiplier"),
    ({"name": "dp_user", "adaptive": True, "target_clipped_quantile": 0.8}, "is now target_unclipped_quantile"),
]


@pytest.mark.parametrize("defense,needle", BAD, ids=[n for _, n in BAD])
def test_bad_defense_blocks_exit_2_one_line(tmp_path, capsys, defense, needle):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_raw(defense=defense)))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedsim: error:") and needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["fedspeed", "fedimpro"])
def test_dp_sgd_refuses_strategies_whose_step_opacus_cannot_privatise(strategy):
    with pytest.raises(ScenarioError, match=rf"^defense\.name: dp_sgd .*{strategy}"):
        parse_scenario(small_raw(strategy={"name": strategy}, defense={"name": "dp_sgd", "noise_multiplier": 1.0}))


def test_dp_sgd_refuses_a_batchnorm_model_with_opacus_reason(monkeypatch):
    import fedsim.scenario.schema as sc

    monkeypatch.setattr(sc, "_nominal_model", lambda s: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    with pytest.raises(ScenarioError, match=r"^model\.name: dp_sgd: Opacus cannot train mlp: .*BatchNorm"):
        parse_scenario(small_raw(defense={"name": "dp_sgd", "noise_multiplier": 1.0}))
    monkeypatch.undo()
    for model in ({"name": "mlp"}, {"name": "lenet"}, {"name": "cnn"}, {"name": "resnet18"}):
        parse_scenario(small_raw(model=model, data__image_size=16, defense={"name": "dp_sgd", "noise_multiplier": 1.0}))


def test_a_list_and_a_block_validate_and_round_trip():
    s = parse_scenario(small_raw(defense=[{"name": "dp_sgd", "noise_multiplier": 1.0}, {"name": "noise"}]))
    assert [b.name for b in s.defenses()] == ["dp_sgd", "noise"]
    again = parse_scenario(__import__("yaml").safe_load(s.to_yaml()))
    assert again.defenses() == s.defenses()
    assert parse_scenario(small_raw(defense={"name": "prune", "ratio": 0.25})).defenses()[0].ratio == 0.25
    assert parse_scenario(small_raw(defense="none")).defenses() == []
    for block in ({"name": "dp_user"}, {"name": "dp_user", "adaptive": True, "noise_multiplier": 0.1},
                  {"name": "dp_sgd", "target_epsilon": 2.0}):  # what clients re-read from the resolved YAML
        s = parse_scenario(small_raw(defense=block))
        assert parse_scenario(__import__("yaml").safe_load(s.to_yaml())).defenses() == s.defenses()


# ----------------------------------------------------------------------------- dp_user adaptive clipping


@pytest.mark.parametrize("clipping", ["client", "server"])
def test_dp_user_adaptive_clipping_adapts_the_norm_and_reports_flowers_epsilon(tmp_path, clipping):
    """Flower's adaptive-clipping wrappers (and adaptiveclipping_mod on the client): from a norm far
    below every update's, the norm grows each round; epsilon is Flower's RDP accountant for the
    Gaussian mechanism of noise_multiplier, once a round."""
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp

    dp = {"name": "dp_user", "clipping": clipping, "adaptive": True, "noise_multiplier": 0.3,
          "clipping_norm": 1e-3, "delta": 1e-4}
    raw = small_raw(train__rounds=3, defense=dp)
    run_scenario(parse_scenario(raw), tmp_path / "a", progress=False)
    run_scenario(parse_scenario(raw), tmp_path / "b", progress=False)
    rows, again = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in rows] == [r["loss"] for r in again]  # Flower's noise, seeded
    norms = [1e-3] + [r["clipping_norm"] for r in rows]
    assert all(b > a for a, b in zip(norms, norms[1:]))  # everything clipped: the norm rises
    for r in rows:
        acc = FlowerRdp(PrivacyConfig(target_delta=1e-4, population_size=4,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
        acc.compose(GaussianPrivacyEvent(noise_multiplier=0.3, sample_size=4, population_size=4), r["round"])
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9) and r["delta"] == 1e-4


def test_dp_user_adaptive_refuses_noise_flower_cannot_split():
    with pytest.raises(ScenarioError, match=r"^defense\.noise_multiplier: .*clipped_count_stddev"):
        parse_scenario(small_raw(defense={"name": "dp_user", "adaptive": True, "noise_multiplier": 1.0}))
    with pytest.raises(ScenarioError, match=r"^defense: .*only with adaptive"):
        parse_scenario(small_raw(defense={"name": "dp_user", "clipped_count_stddev": 1.0}))


def test_adaptive_norm_follows_andrew_et_al():
    """C <- C exp(-lr (unclipped fraction - gamma)): all clipped -> C grows, none clipped -> C shrinks."""
    from defenses.dp_user import ServerSideAdaptiveClipping
    from strategies.fedavg import FedAvgStrategy

    w = ServerSideAdaptiveClipping(FedAvgStrategy(ServerSettings(seed=0, num_clients=4)), 0.1, 4,
                                   initial_clipping_norm=1.0, target_clipped_quantile=0.5, clip_norm_lr=0.2)
    w._geometric_update(1.0)  # every update clipped
    assert w.clipping_norm == pytest.approx(math.exp(0.2 * 0.5))
    w._geometric_update(0.0)  # none clipped
    assert w.clipping_norm == pytest.approx(1.0)


def test_empty_poisson_batches_step_with_noise_alone_in_every_mode():
    """Batch size 1: about a third of Poisson batches are empty. Each still takes a (noise-only) step,
    as in Opacus's DPDataLoader; every per-sample-gradient mode gives the same update."""
    from defenses.dp_sgd import PoissonSampler
    from strategies.trainer import TrainSettings

    raw = small_raw(data__num_clients=40, train__batch_size=1)
    ups = {}
    for mode in ("ew", "hooks", "functorch", "ghost"):
        sent, ups[mode], metrics = _train_once({"name": "dp_sgd", "noise_multiplier": 1.0, "grad_sample_mode": mode}, raw)
    n = int(metrics["num-examples"])
    settings = TrainSettings.from_config(ConfigRecord(client_config(ServerSettings(seed=0, num_clients=40, lr=0.1,
                                                                                   batch_size=1), 1)), 0)
    schedule = PoissonSampler().schedule(n, settings)
    assert metrics["local_steps"] == len(schedule) == n and sum(len(b) == 0 for b in schedule) > n / 5
    for k in sent:
        assert torch.allclose(ups["ew"][k], ups["hooks"][k], atol=1e-6)
        assert torch.allclose(ups["ew"][k], ups["functorch"][k], atol=1e-6)
        assert torch.allclose(ups["ew"][k], ups["ghost"][k], atol=1e-6)


def test_dp_user_client_clipping_clips_the_audit_gradient_answer():
    from defenses.dp_user import QUERY_CLIP_KEY
    from fedsim.audit import answer_gradient_query
    from strategies.fedavg import FedAvgStrategy

    world = world_from_text(parse_scenario(small_raw()).to_yaml())
    model = world.new_model()
    x, y = world.client_tensors(0)[:2]

    def ask(extra):
        cfg = ConfigRecord({"server-round": 1, "seed": 0, "audit-batch-size": 8, **extra})
        content = RecordDict({"arrays": to_record(model.state_dict()), "config": cfg})
        grads = to_torch(answer_gradient_query(content, model, x, y, 0)["gradients"])
        return torch.cat([g.ravel() for g in grads.values()])

    for clipping, adaptive in (("client", False), ("client", True), ("server", False)):
        block = {"name": "dp_user", "clipping": clipping, "clipping_norm": 1e-3, "adaptive": adaptive,
                 "noise_multiplier": 0.1}
        defenses, _ = build_defenses(parse_scenario(small_raw(defense=block)).defenses(), 4, 4, 0, 2)
        defenses[0].wrap_server(FedAvgStrategy(ServerSettings(seed=0, num_clients=4)))
        extra = defenses[0].query_config()
        assert (QUERY_CLIP_KEY in extra) == (clipping == "client")
        answer, plain = ask(extra), ask({})
        if clipping == "client":
            assert answer.norm().item() == pytest.approx(1e-3, rel=1e-4) and plain.norm().item() > 1e-2
            assert torch.nn.functional.cosine_similarity(answer, plain, dim=0) > 0.9999
        else:  # the server clips and noises after it has seen the reply: the answer is the gradient
            assert torch.equal(answer, plain)


@pytest.mark.parametrize("mechanism", ["prv", "gdp"])
def test_other_opacus_accountants_persist_across_rounds(mechanism):
    """The accountant of choice, rebuilt from Context.state each round: after two rounds the client's
    epsilon is that accountant's for twice the steps."""
    from opacus.accountants import create_accountant

    state = RecordDict()
    block = {"name": "dp_sgd", "noise_multiplier": 1.5, "accountant": mechanism}
    _, _, first = _train_once(block, state=state)
    _, _, second = _train_once(block, state=state, server_round=2)
    k = int(first["local_steps"])
    for metrics, steps in ((first, k), (second, 2 * k)):
        acc = create_accountant(mechanism)
        acc.history = [(1.5, 1 / k, steps)]
        assert metrics["dp-epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert second["dp-epsilon"] > first["dp-epsilon"]


def test_update_audit_says_the_replay_leaves_the_defense_out(tmp_path):
    raw = small_raw(train__rounds=1, defense={"name": "prune", "ratio": 0.5},
                    audit={"attack": "ig", "threat": "update", "clients": 1, "attack_config": {"iterations": 2}})
    run_scenario(parse_scenario(raw), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["exact_replay"] is False and "prune" in rows[0]["note"]

