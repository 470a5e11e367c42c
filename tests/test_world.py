"""Worlds are cached by what they are built from (seed, data, model), and build the same
client splits as before the cache and the one-pass partitioning."""

import hashlib

import numpy as np
import pytest
import torch

import fedsim.world.build as world_mod
from fedsim.scenario import ScenarioError, parse_scenario
from fedsim.world.build import adopt_world, build_world, checked_world, world_from_text

from tests.conftest import small_raw


@pytest.fixture
def builds(monkeypatch):
    """Empty world caches for the test; the list counts the worlds built."""
    monkeypatch.setattr(world_mod, "_BUILT", {})
    monkeypatch.setattr(world_mod, "_WORLDS", {})
    built = []

    def counting_build(s):
        built.append(s)
        return build_world(s)

    monkeypatch.setattr(world_mod, "build_world", counting_build)
    return built


def text(**overrides) -> str:
    return parse_scenario(small_raw(**overrides)).to_yaml()


def test_training_settings_share_one_world(builds):
    base = world_from_text(text())
    variants = [text(train__lr=0.01), text(train__rounds=7, train__participation=0.5),
                text(strategy={"name": "fedprox", "mu": 0.1}), text(name="other"),
                text(engine__torch_threads=2), text(output__dir="elsewhere")]
    for t in variants:
        assert world_from_text(t) is base
    assert len(builds) == 1
    # Shared by scenarios that train differently, a World must not offer training settings.
    assert not hasattr(base, "scenario") and not hasattr(base, "train")


@pytest.mark.parametrize("overrides", [
    {"seed": 1},
    {"data__num_clients": 5},
    {"data__partition": {"name": "dirichlet", "alpha": 0.5}},
    {"data__val_fraction": 0.3},
    {"model__hidden": [16]},
], ids=["seed", "num_clients", "partition", "val_fraction", "model"])
def test_seed_data_or_model_change_rebuilds(builds, overrides):
    base = world_from_text(text())
    other = world_from_text(text(**overrides))
    assert other is not base and len(builds) == 2
    assert world_from_text(text(**overrides)) is other  # and is cached in turn
    if "seed" in overrides or "data__partition" in overrides:
        assert not np.array_equal(other.parts[0], base.parts[0])


def test_adopted_world_serves_its_key(builds):
    world = build_world(parse_scenario(small_raw()))
    adopt_world(text(), world)
    assert world_from_text(text()) is world
    assert world_from_text(text(train__lr=0.3)) is world  # same seed, data and model: no rebuild
    assert builds == []


def test_the_world_caches_are_bounded(builds):
    """A process that runs many scenarios (a Ray worker a sweep reuses) keeps the latest MAX_WORLDS
    Worlds, not every one, and no scenario text keeps a dropped World alive."""
    worlds = [world_from_text(text(seed=seed)) for seed in range(world_mod.MAX_WORLDS + 2)]
    assert len(builds) == world_mod.MAX_WORLDS + 2
    assert len(world_mod._BUILT) == world_mod.MAX_WORLDS
    kept = {id(w) for w in world_mod._BUILT.values()}
    assert kept == {id(w) for w in worlds[2:]}
    assert {id(w) for w in world_mod._WORLDS.values()} <= kept
    assert world_from_text(text(seed=world_mod.MAX_WORLDS + 1)) is worlds[-1]  # the latest stay cached
    assert len(builds) == world_mod.MAX_WORLDS + 2


def test_the_client_model_cache_is_bounded():
    """The ClientApp's model per World follows the same bound, checked against the World itself."""
    from fedsim.run import apps

    worlds = [build_world(parse_scenario(small_raw(seed=seed))) for seed in range(world_mod.MAX_WORLDS + 2)]
    cpu = torch.device("cpu")
    models = [apps._model_of(w, cpu) for w in worlds]
    assert len(apps._models) <= world_mod.MAX_WORLDS
    assert apps._model_of(worlds[-1], cpu) is models[-1]


def test_client_without_training_sample_is_bad_input(builds):
    # 20 samples over 20 clients: one each; val_fraction 0.6 rounds to that one sample.
    raw = {"data__dataset": "synthetic", "data__synthetic": {"train": 20, "test": 10},
           "data__num_clients": 20, "data__val_fraction": 0.6}
    with pytest.raises(ScenarioError, match="client 0 gets no training samples .20 clients empty"):
        checked_world(text(**raw))
    assert checked_world(text(**{**raw, "data__val_fraction": 0.5})).client_tensors(19)[1].numel() == 1


# Digests of every client's (train, val) indices as build_world made them before worlds
# were cached by key and before partitioning in one pass (commit 3e68489, eager splits).
RECORDED = {
    "digits-dirichlet-10": ({"data": {"dataset": "digits", "num_clients": 10,
                                      "partition": {"name": "dirichlet", "alpha": 0.5}}}, "099f7acdb3b4bfab"),
    "digits-iid-7-val0.2": ({"seed": 3, "data": {"dataset": "digits", "num_clients": 7, "val_fraction": 0.2}},
                            "df83ae6d1c06bd0b"),
    "synthetic-shards-50": ({"seed": 1, "data": {"dataset": "synthetic", "num_clients": 50,
                                                 "partition": {"name": "shards", "shards_per_client": 3}}},
                            "3a0f880a3b685588"),
    "digits-pathological-12": ({"data": {"dataset": "digits", "num_clients": 12,
                                         "partition": {"name": "pathological", "classes_per_client": 3}}},
                               "6817573a6094514d"),
    "digits-inner-8-val0": ({"seed": 5, "data": {"dataset": "digits", "num_clients": 8, "val_fraction": 0.0,
                                                 "partition": {"name": "inner_dirichlet", "alpha": 0.3}}},
                            "83a99d7f398e324f"),
}


@pytest.mark.parametrize("case", list(RECORDED))
def test_client_splits_as_recorded(case):
    raw, want = RECORDED[case]
    world = build_world(parse_scenario(raw))
    h = hashlib.sha256()
    for i in range(len(world.parts)):
        split = world.client_split(i)
        h.update(np.asarray(split.train, dtype="<i8").tobytes() + b"|"
                 + np.asarray(split.val, dtype="<i8").tobytes() + b";")
    assert h.hexdigest()[:16] == want
