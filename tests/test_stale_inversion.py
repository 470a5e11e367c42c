"""``staleness: invert`` (fedsim.run.stale_inversion): the premise of Wang and Gao (AAAI 2024) on a tiny
case - a stale update converted by gradient inversion points closer to the update the client would send
from the current model than the stale update itself does - and the asynchronous loop's use of it."""

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from attacks.objective import cosine_distance, leaf_parameters, local_sgd_update
from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.run.stale_inversion import StaleInversion
from fedsim.scenario import parse_scenario
from fedsim.world.data import load_dataset
from fedsim.world.models import build_model
from strategies import TrainSettings
from strategies.asynchronous import AsyncParams, AsyncUpdate
from strategies.base import ServerSettings, client_config
from strategies.records import to_record
from strategies.trainer import EpochShuffleSampler
from tests.conftest import small_raw


def _local_update(model, x, y, settings, schedule) -> list[torch.Tensor]:
    """The client's plain local SGD from ``model``'s weights (the replay the audit's tests match to the trainer)."""
    return [d.detach() for d in local_sgd_update(model, leaf_parameters(model), x, y, lr=settings.lr,
                                                 schedule=schedule, create_graph=False)]


def test_an_inverted_update_is_closer_to_the_fresh_one_than_the_stale_update(one_torch_thread):
    data = load_dataset("digits", seed=0)
    x, y = data.x_train[:8], data.y_train[:8]            # the slow client's data
    xo, yo = data.x_train[100:164], data.y_train[100:164]  # what the others trained on meanwhile
    new_model = lambda: build_model("mlp", 1, data.image_size, 10, hidden=(32,), seed=0)  # noqa: E731
    old = new_model()
    # The global model moves on while the client trains: 20 steps of the others' training.
    current = new_model()
    for _ in range(20):
        step = _local_update(current, xo, yo, TrainSettings(1, 0.5, 1, 64, 0.0, 0.0, 0), [torch.arange(64)])
        with torch.no_grad():
            for p, d in zip(current.parameters(), step):
                p.add_(d)
    config = ConfigRecord(client_config(ServerSettings(seed=3, num_clients=4, lr=0.1, local_epochs=2, batch_size=4), 1))
    settings = TrainSettings.from_config(config, 0)
    schedule = EpochShuffleSampler().schedule(len(y), settings)
    stale = _local_update(old, x, y, settings, schedule)
    fresh = _local_update(current, x, y, settings, schedule)  # what it would have sent from the current model
    names = [n for n, _ in old.named_parameters()]
    sent = to_record(old.state_dict())
    mine = to_record({k: v + dict(zip(names, stale)).get(k, 0) for k, v in old.state_dict().items()})
    update = AsyncUpdate(RecordDict({"arrays": mine, "metrics": MetricRecord({"num-examples": len(y)})}), sent, 20,
                         float(len(y)), config, 0)
    params = AsyncParams(concurrency=1, staleness="invert", invert_threshold=1, invert_iterations=100,
                         invert_config={"label_assignment": "sorted"})  # measured: cosine distance 0.004 against 0.55
    inversion = StaleInversion(params, new_model, (1, data.image_size, data.image_size), 10, seed=0)
    assert inversion.due(update)
    out = inversion.convert(update, to_record(current.state_dict()), server_step=21)
    assert out.update.staleness == 0 and out.iterations == 100
    delta = out.update.delta()
    inverted = [delta[k].float() for k in names]
    to_fresh_stale, to_fresh_inverted = (float(cosine_distance(u, fresh)) for u in (stale, inverted))
    assert to_fresh_inverted < 0.25 * to_fresh_stale, (to_fresh_inverted, to_fresh_stale)


def test_fedbuff_inverts_the_stale_updates_and_counts_their_server_time(tmp_path):
    per_iteration = 0.01
    strategy = {"name": "fedbuff", "concurrency": 3, "buffer": 2, "staleness": "invert", "invert_threshold": 0,
                "invert_iterations": 5, "invert_config": {"label_assignment": "sorted"}, "invert_time": per_iteration}
    raw = small_raw(strategy=strategy, train__rounds=4, data__num_clients=6,
                    system={"step_s": {"dist": "lognormal", "median": 0.02, "sigma": 1.0}})
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["inverted"] for r in rows] == [sum(s > 0 for s in r["staleness"]) for r in rows]
    assert sum(r["inverted"] for r in rows) > 0
    for r in rows:  # each inversion's iterations are server time in the step
        assert r["virtual_s"] >= r["inverted"] * 5 * per_iteration
        assert (r["invert_wall_s"] is None) == (r["inverted"] == 0)


@pytest.mark.parametrize("strategy, line", [
    ({"staleness": "invert", "invert_attack": "dlg_nope"}, "strategy.invert_attack: 'dlg_nope' is no attack"),
    ({"staleness": "invert", "invert_config": {"iterations": 3}}, "strategy.invert_config.iterations: the budget"),
    ({"staleness": "invert", "invert_config": {"lr": "fast"}}, "strategy.invert_config: lr: expected float"),
    ({"staleness": "invert", "invert_config": {"speed": 1}}, "strategy.invert_config.speed: ig has no setting 'speed'"),
])
def test_bad_inversion_settings_are_one_line(strategy, line):
    from fedsim.scenario.schema import ScenarioError

    with pytest.raises(ScenarioError) as exc:
        parse_scenario(small_raw(strategy={"name": "fedbuff", "concurrency": 2, **strategy}, system={}))
    assert str(exc.value).startswith(line)
