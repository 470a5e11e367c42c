"""The gradient threat's query: the client's side (``answer_gradient_query``, one batch gradient at the sent
model through the client-side defenses) and the plain batch gradient it starts from."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from strategies.records import to_record, to_torch
from strategies.trainer import forked_rng, seed_dropout

from .targets import AUDIT_STREAM, query_batch

QUERY_GRADIENT = "audit_gradient"  # the ClientApp query action ("query.audit_gradient")


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """d(mean cross-entropy)/d(parameters) on (x, y), dropout active as in training, without
    touching the caller's random streams."""
    with forked_rng(x.device):
        seed_dropout(seed, x.device)
        was = model.training
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        model.train(was)
    return {name: g.detach() for (name, _), g in zip(model.named_parameters(), grads)}


def answer_gradient_query(msg_content: RecordDict, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          partition_id: int) -> RecordDict:
    """The client's side of the gradient threat: one batch gradient at the sent model, computed as the
    client's defenses would have it trained (an in-training defense's private gradient) and through
    their transforms in order, as the query's config asks (``defenses.client``)."""
    from defenses.client import client_defenses, defend_gradient

    cfg = msg_content["config"]
    model.load_state_dict(to_torch(msg_content["arrays"]))
    rnd, seed = int(cfg["server-round"]), int(cfg["seed"])
    idx = torch.from_numpy(query_batch(len(y), int(cfg["audit-batch-size"]), seed, rnd, partition_id))
    grad_seed = int(np.random.default_rng([seed, AUDIT_STREAM, rnd, partition_id, 2]).integers(2**62))
    defenses = client_defenses(cfg)
    grads = next((g for g in (d.private_gradient(model, x[idx], y[idx], cfg, len(y), grad_seed) for d in defenses)
                  if g is not None), None)
    if grads is None:
        grads = batch_gradient(model, x[idx], y[idx], seed=grad_seed)
    grads = defend_gradient(grads, defenses, cfg, partition_id)
    return RecordDict({"gradients": to_record(grads),
                       "fedsim": ConfigRecord({"partition-id": partition_id, "batch-size": len(idx)})})
