"""The attacks' replay of a client's local training equals what the client really uploaded.

The client runs fedsim's ClientApp (FedAvg, 2 epochs, batch 2, momentum 0.9, weight decay);
the auditor knows what the server knows (the model and config it sent, the client's sample
count) and recomputes the batch schedule from the seeded sampler; only the scoring side
holds the client's data, which it feeds to the replay here to check the simulation itself.
"""

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from attacks import Observation
from attacks.objective import leaf_parameters, local_sgd_update
from fedsim.run.apps import client_app
from fedsim.engines.identity import enter_server_identity
from fedsim.scenario import parse_scenario
from fedsim.world import world_from_text
from strategies import ServerSettings, TrainSettings, client_config
from strategies.records import to_record, to_torch
from strategies.trainer import EpochShuffleSampler
from tests.conftest import small_raw


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = [t.detach() for t in a], [t.detach() for t in b]
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b))
    return (num / sum(float((y**2).sum()) for y in b)) ** 0.5


def test_replay_of_fedavg_update_equals_the_upload():
    scenario = parse_scenario(small_raw(data__num_clients=40, model={"name": "lenet"},
                                        data__image_size=16))
    yaml_text = scenario.to_yaml()
    world = world_from_text(yaml_text)
    model = world.new_model()
    settings = ServerSettings(seed=3, num_clients=40, lr=0.05, local_epochs=2, batch_size=2, momentum=0.9,
                              weight_decay=1e-3, strategy="fedavg", strategy_params="{}")
    config = client_config(settings, server_round=4)
    enter_server_identity(1)
    pid = 7
    sent = to_record(model.state_dict())
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord(config)}), 1000 + pid, MessageType.TRAIN,
                  group_id="4")
    msg.metadata.__dict__["_message_id"] = "m"
    context = Context(run_id=1, node_id=1000 + pid, node_config={"partition-id": pid, "num-partitions": 40},
                      state=RecordDict(), run_config={"scenario-yaml": yaml_text})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    assert reply.content["fedsim"]["partition-id"] == pid
    uploaded = {k: v - to_torch(sent)[k] for k, v in to_torch(reply.content["arrays"]).items()}

    # What the server knows: the model and config it sent, and the client's sample count.
    n = int(reply.content["metrics"]["num-examples"])
    train = TrainSettings.from_config(ConfigRecord(config), pid)
    schedule = EpochShuffleSampler().schedule(n, train)
    assert len(schedule) == int(reply.content["metrics"]["local_steps"]) == 2 * -(-n // 2)
    names = [name for name, _ in model.named_parameters()]
    obs = Observation.from_update(model, {k: uploaded[k] for k in names}, lr=train.lr, local_steps=len(schedule),
                                  input_shape=(1, 16, 16), num_classes=10, num_samples=n, local_batch_size=2,
                                  schedule=schedule, momentum=train.momentum, weight_decay=train.weight_decay)

    # The scorer's side: the client's true data, through the attack's differentiable replay.
    x, y = world.client_tensors(pid)[:2]
    replayed = local_sgd_update(obs.model, leaf_parameters(obs.model), x, y, lr=obs.lr, schedule=obs.schedule,
                                momentum=obs.momentum, weight_decay=obs.weight_decay, create_graph=False)
    error = _relative(replayed, obs.update)
    print(f"replay vs upload: relative L2 {error:.2e}")
    assert error < 1e-5
    # The old assumption (consecutive slices, plain SGD) is far from it: the test can fail.
    naive = local_sgd_update(obs.model, leaf_parameters(obs.model), x, y, lr=obs.lr, steps=len(schedule),
                             batch_size=2, create_graph=False)
    assert _relative(naive, obs.update) > 0.05
