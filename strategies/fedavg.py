"""FedAvg: local SGD on each client, server averages the models weighted by examples.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The server side is Flower's FedAvg, its ``aggregate_train``
included (``aggregate_arrayrecords`` weighted by ``num-examples``), with fedsim's seeded
sampling.
"""

from __future__ import annotations

from .base import ClientAlgorithm, ClientJob, NoParams, SeededSampling, StrategySpec, VectorRule
from .upload import Upload


class FedAvgStrategy(SeededSampling):
    """Flower FedAvg plus seeded sampling and per-round training settings."""


class FedAvgClient(ClientAlgorithm):
    def train(self, job: ClientJob) -> Upload:
        trainer = job.trainer()
        trainer.run()
        return job.upload(trainer)


SPEC = StrategySpec(
    name="fedavg",
    params=NoParams,
    server=lambda params, settings: FedAvgStrategy(settings),
    client=FedAvgClient,
    vector_rule=VectorRule,  # plain local SGD: nothing added to the engine's step
)
