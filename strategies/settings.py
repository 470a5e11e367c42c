"""The training settings, declared once: the scenario's ``train`` section is this model, the server
strategy's settings extend it (``strategies.base.ServerSettings``), and the server writes them into
every training message (``strategies.base.client_config``), where the client reads them back
(``strategies.trainer.TrainSettings``: this round's values, read from the message alone)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    rounds: int = Field(10, ge=1, description="server rounds")
    local_epochs: int = Field(1, ge=1, description="passes over its data a client makes a round")
    batch_size: int = Field(32, ge=1, description="local minibatch size")
    lr: float = Field(0.05, gt=0, description="the clients' SGD learning rate")
    lr_decay: float = Field(1.0, gt=0, le=1, description="lr multiplier per round")
    momentum: float = Field(0.0, ge=0, lt=1, description="local SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="local SGD weight decay")
    participation: float = Field(1.0, gt=0, le=1, description="fraction of clients per round")
    sampling: Literal["fixed", "bernoulli"] = Field(
        "fixed", description="fixed: round(participation*N) clients; bernoulli: each client with p"
    )
    deadline_s: float | None = Field(None, gt=0, description="virtual seconds a synchronous round waits; later "
                                     "clients are dropped as stragglers (needs a system section; docs/time.md)")
