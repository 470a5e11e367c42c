"""DP-SGD over several rounds against Opacus's own loop, bit for bit (issue 22).

Three rounds of one client with momentum and weight decay, each round's model the last round's
upload, against GradSampleModule + DPOptimizer driven by the same Poisson batches and noise
generator; and a client whose tiny batches leave some steps empty, where Opacus's own loop forwards
an empty batch (as its DPDataLoader yields one) and fedsim steps with noise alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from defenses import build_defenses
from defenses.dp_sgd import DP_NOISE_STREAM, PoissonSampler, steps_per_epoch
from fedsim.scenario import parse_scenario
from fedsim.world import world_from_text
from strategies import ServerSettings, client_config
from strategies.records import to_record, to_torch
from strategies.trainer import TrainSettings
from tests.conftest import small_raw

SIGMA, CLIP = 1.1, 0.7


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def fedsim_rounds(mode: str, batch_size: int, rounds: int, **train):
    """(each round's sent state dict, its upload, the config it was sent with) for one client, each round
    sent the previous round's upload, through the real ClientApp."""
    from fedsim.engines.identity import enter_server_identity
    from fedsim.run.apps import client_app

    raw = small_raw(train__batch_size=batch_size, **{f"train__{k}": v for k, v in train.items()})
    scenario = parse_scenario(raw)
    text = scenario.to_yaml()
    _, extra = build_defenses(parse_scenario({**raw, "defense": {
        "name": "dp_sgd", "noise_multiplier": SIGMA, "max_grad_norm": CLIP, "grad_sample_mode": mode}}).defenses(),
        4, 4, 0, rounds)
    settings = ServerSettings(**scenario.train.model_dump(), seed=scenario.seed, num_clients=4)
    enter_server_identity(1)
    state, out = RecordDict(), []
    weights = {k: v.clone() for k, v in world_from_text(text).new_model().state_dict().items()}
    for rnd in range(1, rounds + 1):
        config = ConfigRecord({**extra, **client_config(settings, rnd)})
        msg = Message(RecordDict({"arrays": to_record(weights), "config": config}), 1000, MessageType.TRAIN,
                      group_id=str(rnd))
        msg.metadata.__dict__["_message_id"] = f"m{rnd}"
        context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 4}, state=state,
                          run_config={"scenario-yaml": text})
        up = to_torch(client_app(msg, context).content["arrays"])
        out.append((weights, up, config))
        weights = up
    return text, out


def opacus_round(text: str, sent: dict, config: ConfigRecord, mode: str) -> tuple[dict, int]:
    """Opacus's own loop for one round: its modules, its optimizer, fedsim's batches and generator."""
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    world = world_from_text(text)
    model = world.new_model()
    model.load_state_dict(sent)
    x, y = world.client_tensors(0)[:2]
    s = TrainSettings.from_config(config, 0)
    k = steps_per_epoch(len(y), s.batch_size)
    torch.default_generator.manual_seed(s.seed)
    noise = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, DP_NOISE_STREAM]).integers(2**62)))
    sgd = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    gsm = wrap_model(model, mode, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(sgd, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=max(1, int(len(y) / k)),
                      generator=noise)
    model.train()
    empty = 0
    for idx in PoissonSampler().schedule(len(y), s):
        empty += not len(idx)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(gsm(x[idx]), y[idx]).backward()  # an empty batch forwards 0 samples
        opt.step()
    gsm.cleanup()
    return model.state_dict(), empty


@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_three_rounds_with_momentum_and_weight_decay_are_opacus_bit_for_bit(mode):
    text, rounds = fedsim_rounds(mode, batch_size=32, rounds=3, momentum=0.9, weight_decay=5e-4, lr_decay=0.9)
    for sent, up, config in rounds:
        expected, _ = opacus_round(text, sent, config, mode)
        assert all(torch.equal(expected[k], up[k]) for k in up), f"round {config['server-round']}"
        assert not all(torch.equal(sent[k], up[k]) for k in up)


def test_a_client_with_empty_poisson_batches_is_opacus_bit_for_bit():
    """Batch 2 over ~90 samples: q ~ 1/45, so some of a round's ~45 steps draw no sample. Opacus's hooks
    take the empty forward; fedsim steps with noise alone: the same update."""
    text, rounds = fedsim_rounds("hooks", batch_size=2, rounds=2, momentum=0.5)
    total_empty = 0
    for sent, up, config in rounds:
        expected, empty = opacus_round(text, sent, config, "hooks")
        total_empty += empty
        assert all(torch.equal(expected[k], up[k]) for k in up), f"round {config['server-round']}"
    assert total_empty > 0  # the case under test happened
