"""engine.name: vectorized trains a round's clients together and gives the inline engine's result.

Equality is to float reduction order (a batched matmul, a weighted sum for the mean loss): the final
global arrays within 1e-5 relative per tensor, the same participants, the same reply form, accuracy
within 0.002; one seed gives one result run to run. What it cannot train exactly is refused at
validation, in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedsim.run.apps as apps
from fedsim.engines import run_scenario
from fedsim.engines.inline import InlineGrid
from fedsim.run.results import read_metrics
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world import build_world
from tests.conftest import small_raw

ROUNDS = 5
TOLERANCE = 1e-5


def hetero_raw(strategy: dict, **overrides) -> dict:
    """6 clients of different sizes (Dirichlet), half of them a round, batches of 16: short last batches,
    clients with different step counts, clients that skip rounds (their state kept)."""
    raw = small_raw(strategy=strategy, data__num_clients=6, train__rounds=ROUNDS, train__participation=0.5,
                    data__partition={"name": "dirichlet", "alpha": 0.5}, train__batch_size=16, **overrides)
    raw["output"]["checkpoint_every"] = 0
    return raw


def run(raw: dict, engine: str, out, monkeypatch) -> dict:
    """Run on ``engine``: the summary, the final global arrays, each round's replying nodes and reply form."""
    raw = {**raw, "engine": {"name": engine, **({"vectorized": {"chunk": 2}} if engine == "vectorized" else {})}}
    final, rounds = {}, []
    run_rounds, send = apps.run_rounds, InlineGrid.send_and_receive

    def spy_rounds(*args, **kwargs):
        final["arrays"] = run_rounds(*args, **kwargs)
        return final["arrays"]

    def spy_send(self, messages, *, timeout=None):
        replies = list(send(self, messages, timeout=timeout))
        rounds.append(sorted((r.metadata.src_node_id, tuple(sorted(r.content.keys())),
                              tuple(sorted(r.content["metrics"].keys())), dict(r.content["fedsim"]))
                             for r in replies if not r.has_error()))
        return replies

    monkeypatch.setattr(apps, "run_rounds", spy_rounds)
    monkeypatch.setattr(InlineGrid, "send_and_receive", spy_send)
    summary = run_scenario(parse_scenario(raw), out, progress=False)
    monkeypatch.undo()
    arrays = {k: v.numpy().astype(np.float64) for k, v in final["arrays"].items()}
    return {"summary": summary, "arrays": arrays, "rounds": rounds, "rows": read_metrics(out)}


def max_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a)


def assert_same_run(inline: dict, vec: dict) -> float:
    rel = max_relative(inline["arrays"], vec["arrays"])
    assert rel <= TOLERANCE, f"global arrays differ by {rel:.3g} relative"
    assert vec["rounds"] == inline["rounds"]  # same participants, same reply records and metric keys
    assert len(vec["rounds"]) == ROUNDS and all(vec["rounds"])
    for a, b in zip(inline["rows"], vec["rows"]):
        assert a["participants"] == b["participants"] and a["bytes_up"] == b["bytes_up"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.002
        assert b["train_metrics"]["local_steps"] == pytest.approx(a["train_metrics"]["local_steps"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert vec["summary"]["failures_total"] == inline["summary"]["failures_total"] == 0
    assert vec["summary"]["engine"] == "vectorized"
    return rel


def test_the_split_has_short_batches_and_unequal_clients():
    """The equality runs below cover what masking is for."""
    raw = hetero_raw({"name": "fedavg"})
    world = build_world(parse_scenario(raw))
    sizes = [len(world.client_tensors(i)[1]) for i in range(6)]
    assert len(set(sizes)) > 3  # different sample counts, so different step counts
    assert any(n % 16 for n in sizes)  # short last batches
    assert len({-(-n // 16) for n in sizes}) > 1


@pytest.mark.parametrize("strategy, overrides", [
    ({"name": "fedavg"}, {"train__momentum": 0.5, "train__weight_decay": 1e-3}),
    ({"name": "fedprox", "mu": 0.1}, {}),
    ({"name": "scaffold"}, {}),
    ({"name": "scaffold", "variant": "I", "weighting": "examples"}, {}),
    ({"name": "fedadam"}, {}),  # Flower's classes whose client is FedAvg's: the same rule
    ({"name": "krum"}, {}),
    # SAM's two gradients a step, each client's dual, clip and x_hat upload; max_norm small enough to clip
    ({"name": "fedspeed", "max_norm": 0.5}, {"train__momentum": 0.5}),
    ({"name": "fedspeed", "fidelity": "reference", "alpha": 1.0}, {"train__weight_decay": 1e-3}),
    ({"name": "fedspeed", "alpha": 0.5, "server_correction": "all", "lamb": 0.0}, {}),
    ({"name": "fedce"}, {}),  # scores before training on each client's validation split, last model kept
    ({"name": "fedce", "fidelity": "nvflare-main", "mode": "times"}, {}),
])
def test_vectorized_matches_inline(tmp_path, monkeypatch, one_torch_thread, strategy, overrides):
    raw = hetero_raw(strategy, **overrides)
    inline = run(raw, "inline", tmp_path / "inline", monkeypatch)
    vec = run(raw, "vectorized", tmp_path / "vec", monkeypatch)
    rel = assert_same_run(inline, vec)
    print(f"{strategy}: max relative difference {rel:.3g}")


def test_vectorized_is_the_same_run_to_run(tmp_path, monkeypatch, one_torch_thread):
    raw = hetero_raw({"name": "scaffold"})
    a = run(raw, "vectorized", tmp_path / "a", monkeypatch)
    b = run(raw, "vectorized", tmp_path / "b", monkeypatch)
    assert all(np.array_equal(a["arrays"][k], b["arrays"][k]) for k in a["arrays"])
    keys = ("accuracy", "loss", "train_loss", "bytes_up")
    assert [[r[k] for k in keys] for r in a["rows"]] == [[r[k] for k in keys] for r in b["rows"]]


@pytest.mark.parametrize("upload", [{"codec": "topk", "ratio": 0.2},
                                    {"codec": "dgc", "ratio": 0.2, "momentum": 0.5, "sample_ratio": 1.0}])
def test_a_codec_and_the_clip_defense_compose(tmp_path, monkeypatch, one_torch_thread, upload):
    """Each client's trained weights go through the update defense and the codec as on inline; DGC keeps its
    residual and momentum in the node's Context.state across rounds (clients skip rounds in between)."""
    raw = hetero_raw({"name": "fedprox", "mu": 0.05}, upload=upload, defense={"name": "clip", "max_norm": 0.5})
    inline = run(raw, "inline", tmp_path / "inline", monkeypatch)
    vec = run(raw, "vectorized", tmp_path / "vec", monkeypatch)
    rel = assert_same_run(inline, vec)
    print(f"{upload['codec']} + clip: max relative difference {rel:.3g}")
    assert all(r["update_clip_fraction"] == a["update_clip_fraction"] for r, a in zip(vec["rows"], inline["rows"]))


@pytest.mark.parametrize("overrides, where, what", [
    ({"strategy": {"name": "qfedavg"}}, "engine.name:", "qfedavg"),
    ({"strategy": {"name": "fedimpro"}}, "engine.name:", "fedimpro"),
    ({"defense": {"name": "dp_sgd", "noise_multiplier": 1.0}}, "defense.name:", "dp_sgd"),
    ({"defense": [{"name": "clip", "max_norm": 1.0}, {"name": "dp_user", "noise_multiplier": 0.1,
                                                       "clipping_norm": 1.0}]}, "defense.1.name:", "dp_user"),
    ({"model__dropout": 0.2}, "model.dropout:", "dropout"),
])
def test_what_cannot_be_vectorised_is_refused_in_one_line(overrides, where, what):
    raw = small_raw(**overrides)
    parse_scenario(raw)  # fine on the inline engine
    raw["engine"] = {"name": "vectorized"}
    with pytest.raises(ScenarioError) as err:
        parse_scenario(raw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(where) and what in message and "vectorized" in message


def test_models_with_buffers_are_refused(monkeypatch):
    from fedsim.scenario.schema import Scenario

    monkeypatch.setattr(Scenario, "nominal_model",
                        lambda self: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    raw = small_raw()
    raw["engine"] = {"name": "vectorized"}
    with pytest.raises(ScenarioError, match=r"^model.name: .*buffers.*running_mean"):
        parse_scenario(raw)


def test_chunk_must_be_positive():
    raw = small_raw()
    raw["engine"] = {"name": "vectorized", "vectorized": {"chunk": 0}}
    with pytest.raises(ScenarioError, match="chunk"):
        parse_scenario(raw)


def test_the_round_timeout_holds_per_chunk(tmp_path):
    """A chunk back after engine.timeout_s is dropped and later chunks never run: timeouts, as on inline."""
    results = {}
    for engine in ("inline", "vectorized"):
        raw = small_raw()
        raw["engine"] = {"name": engine, "timeout_s": 1e-6, "vectorized": {"chunk": 2}}
        results[engine] = run_scenario(parse_scenario(raw), tmp_path / engine, progress=False)
    assert results["vectorized"]["failure_reasons"] == results["inline"]["failure_reasons"]
    assert results["vectorized"]["failures_total"] == 8


def test_a_chunk_that_raises_fails_its_clients_and_the_run_goes_on(tmp_path, monkeypatch):
    import fedsim.engines.vectorized as vectorized

    train = vectorized.train_stacked

    def flaky(model, jobs, *args):
        if any(job.data.partition_id == 0 for job in jobs):
            raise RuntimeError("boom")
        return train(model, jobs, *args)

    monkeypatch.setattr(vectorized, "train_stacked", flaky)
    raw = small_raw()
    raw["engine"] = {"name": "vectorized", "vectorized": {"chunk": 2}}
    summary = run_scenario(parse_scenario(raw), tmp_path, progress=False)
    assert summary["failures_total"] == 4  # partitions 0 and 1 (one chunk), both rounds
    (reason,) = summary["failure_reasons"]
    assert reason.startswith("RuntimeError: boom (")


def test_train_stacked_is_each_clients_local_trainer(one_torch_thread):
    """Unequal clients (1 to 33 samples: short and single-row batches, 1 to 5 steps an epoch), each from
    its own weights, momentum and weight decay, 2 epochs: each slice is what LocalTrainer gives that client."""
    from strategies.base import ClientJob, VectorRule
    from strategies.trainer import ClientData, EpochShuffleSampler, LocalTrainer, TrainSettings

    from fedsim.engines.vectorized import train_stacked
    from fedsim.world.models import build_model

    model = build_model("mlp", 1, 4, 5, hidden=(12,), seed=0)
    gen = torch.Generator().manual_seed(1)
    jobs, expected = [], []
    for i, n in enumerate([7, 20, 1, 33]):
        x, y = torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)
        data = ClientData(i, x, y, None, None)
        settings = TrainSettings(1, 0.1, 2, 8, 0.9, 1e-3, seed=100 + i)
        sent = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        local = build_model("mlp", 1, 4, 5, hidden=(12,), seed=0)
        local.load_state_dict(sent)
        trainer = LocalTrainer(local, data, settings)
        metrics = trainer.run()
        expected.append(({k: v.detach().clone() for k, v in local.state_dict().items()}, metrics))
        jobs.append(ClientJob(model, data, settings, None, None, sent))
    schedules = [EpochShuffleSampler().schedule(job.data.num_examples, job.settings) for job in jobs]
    names = [k for k, _ in model.named_parameters()]
    weights, steps, losses = train_stacked(model, jobs, schedules, VectorRule(None), names)
    for i, (want, metrics) in enumerate(expected):
        got = {k: weights[k][i] for k in names}
        assert max_relative({k: v.double().numpy() for k, v in want.items()},
                            {k: v.double().numpy() for k, v in got.items()}) <= TOLERANCE
        assert steps[i] == metrics["local_steps"]
        assert losses[i] / steps[i] == pytest.approx(metrics["train_loss"], rel=1e-5)


def test_the_audit_reads_vectorized_rounds_as_inline_ones(tmp_path, one_torch_thread):
    """The update audit replays the schedule from the sent settings: the same rows on both engines (a LeNet:
    convolutions under vmap too). Slow: the audit attacks in a process of its own."""
    import json

    rows = {}
    for engine in ("inline", "vectorized"):
        raw = small_raw(model={"name": "lenet", "init": "uniform"}, data__image_size=16, data__num_clients=30,
                        train__batch_size=4, train__participation=0.1)
        raw["audit"] = {"attack": "ig", "every": 1, "clients": 1, "attack_config": {"iterations": 5}}
        raw["engine"] = {"name": engine}
        run_scenario(parse_scenario(raw), tmp_path / engine, progress=False)
        rows[engine] = [{k: r[k] for k in ("round", "client", "exact_replay", "images")} | {"psnr": round(r["psnr"], 2)}
                        for r in map(json.loads, (tmp_path / engine / "audit.jsonl").read_text().splitlines())]
    assert rows["vectorized"] == rows["inline"] and len(rows["inline"]) == 2


def test_an_interrupted_vectorized_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, one_torch_thread):
    """The nodes' Context.state (SCAFFOLD's c_i, DGC's residuals) goes through the checkpoint as on inline."""
    from fedsim.run.resume import main as resume_main
    from tests.test_resume import _assert_same_run, _interrupted

    raw = hetero_raw({"name": "scaffold"}, upload={"codec": "dgc", "ratio": 0.2, "momentum": 0.5})
    raw["output"]["checkpoint_every"] = 1
    raw["engine"] = {"name": "vectorized", "vectorized": {"chunk": 2}}
    run_scenario(parse_scenario(raw), tmp_path / "alone", progress=False)
    _interrupted(raw, tmp_path / "cut", at=3, monkeypatch=monkeypatch)
    assert resume_main([str(tmp_path / "cut"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "cut", tmp_path / "alone")


def test_ray_actors_train_their_share_vectorised(local_ray, tmp_path, monkeypatch, one_torch_thread):
    """engine.ray.vectorized: each of two actors trains its share of a round together (chunks of 2); the run
    is the inline engine's up to float reduction order, as engine vectorized's is."""
    raw = hetero_raw({"name": "scaffold"})
    inline = run(raw, "inline", tmp_path / "inline", monkeypatch)
    final = {}
    run_rounds = apps.run_rounds

    def spy_rounds(*args, **kwargs):
        final["arrays"] = run_rounds(*args, **kwargs)
        return final["arrays"]

    monkeypatch.setattr(apps, "run_rounds", spy_rounds)
    raw = {**raw, "engine": {"name": "ray", "ray": {"num_actors": 2, "vectorized": True}, "vectorized": {"chunk": 2}}}
    summary = run_scenario(parse_scenario(raw), tmp_path / "ray", progress=False)
    arrays = {k: v.numpy().astype(np.float64) for k, v in final["arrays"].items()}
    rel = max_relative(inline["arrays"], arrays)
    # not 0: the actors trained vectorised (a per-client Ray run is the inline run bit for bit)
    assert 0 < rel <= TOLERANCE
    rows = read_metrics(tmp_path / "ray")
    assert [r["participants"] for r in rows] == [r["participants"] for r in inline["rows"]]
    assert summary["failures_total"] == 0
    assert all(b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5) for a, b in zip(inline["rows"], rows))


def test_ray_vectorized_refuses_what_engine_vectorized_refuses():
    raw = small_raw(strategy={"name": "fedimpro"})
    raw["engine"] = {"name": "ray", "ray": {"vectorized": True}}
    with pytest.raises(ScenarioError, match=r"^engine\.ray\.vectorized: engine\.ray\.vectorized trains only .*"
                                            r"set engine\.ray\.vectorized: false$"):
        parse_scenario(raw)
