"""q-FedAvg (Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020):
Flower's ``QFedAvg`` on the server, with the loss its rule reads sent by the client.

The rule weights client k's update by ``F_k(w)^q``, where ``F_k(w)`` is the loss of the global model
``w`` it was sent on its whole training data: the authors' code (litian96/fair_flearn,
``flearn/trainers/qffedavg.py``: ``c.get_loss()`` after ``c.set_params(self.latest_model)``, before
``solve_inner``) computes it there. Flower's QFedAvg reads whatever the reply's metric
``train_loss_key`` holds; fedsim's client sends both:
- ``global_model_loss``: the sent model's mean cross-entropy on the client's training data (eval mode,
  before local training): the paper's rule, the default here;
- ``train_loss``: the mean loss over the client's local steps, Flower's default key (a named
  deviation, for comparison with Flower's examples).
The Lipschitz estimate is ``1 / client_learning_rate``, with ``train.lr`` as the clients' rate (and a
fixed rate: ``train.lr_decay`` must be 1). The update is plain local SGD (the audit replays it exactly).

No accounted DP defense composes with it: the aggregate depends on each client's loss, which neither
DP-SGD nor Flower's wrappers privatise, so an epsilon would not cover what the server releases.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from flwr.serverapp.strategy import QFedAvg
from pydantic import BaseModel, Field, create_model
from torch import nn

from .base import ClientAlgorithm, ClientJob
from .flower import flower_params, flower_spec
from .rules import RuleViolation
from .upload import Upload

GLOBAL_MODEL_LOSS = "global_model_loss"


@torch.no_grad()
def global_model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on (x, y)."""
    model.eval()
    total = sum(float(nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
                for i in range(0, len(y), batch))
    return total / max(len(y), 1)


class QFedAvgClient(ClientAlgorithm):
    def train(self, job: ClientJob) -> Upload:
        loss = global_model_loss(job.model, job.data.x, job.data.y)  # before training: at the sent model
        trainer = job.trainer()
        trainer.run()
        return job.upload(trainer, metrics={**trainer.metrics(), GLOBAL_MODEL_LOSS: loss})


QFedAvgParams = create_model(
    "QFedAvgParams", __base__=flower_params(QFedAvg),
    train_loss_key=(Literal["global_model_loss", "train_loss"],
                    Field("global_model_loss", description="the loss q-FedAvg weights by: the sent model's "
                          "(the paper's) or the mean over local steps (Flower's default key)")))


def _check(params: BaseModel, scenario: Any, at: tuple[str, ...]) -> None:
    from defenses import DEFENSES

    if scenario.train.lr_decay != 1:
        raise RuleViolation(("train", "lr_decay"), "qfedavg estimates the Lipschitz constant as 1 / the clients' "
                            "learning rate, one fixed rate (Flower's QFedAvg): use lr_decay: 1")
    for i, block in enumerate(scenario.defenses()):
        if DEFENSES[block.name].accounts_epsilon:
            raise RuleViolation(("defense", *((str(i),) if len(scenario.defenses()) > 1 else ()), "name"),
                                f"{block.name} accounts an epsilon for the updates, but qfedavg's aggregate also "
                                f"weights them by each client's loss, which no defense privatises")


SPEC = flower_spec("qfedavg", QFedAvg, client=QFedAvgClient, params=QFedAvgParams, check=_check)
