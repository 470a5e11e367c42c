"""The client's side of every defense, read from the training (or audit query) message alone.

The server puts the ordered list of client-side defense steps in the config under
``defenses`` (JSON, each step a defense's settings with its ``name``); a defense may also be
asked for by a key of its own (Flower's DP wrappers put theirs in the config). A client builds
each step's ``ClientDefense`` (``defenses.base``) from the registry and applies them in that
order: the in-training hook (``private_training``), the update transforms after training and
before the codec (``defend_upload``), the audit's gradient answer the same way
(``defend_gradient``), and the wrappers of the whole call. Nothing here names a defense.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from .base import ClientDefense, transform_generator

DEFENSES_KEY = "defenses"


def client_steps(config: ConfigRecord | dict) -> list[dict[str, Any]]:
    return json.loads(str(config[DEFENSES_KEY])) if DEFENSES_KEY in config else []


def client_defenses(config: ConfigRecord | dict) -> list[ClientDefense]:
    """The client halves this message asks for: its steps in order, then those a key of their own activates."""
    from .registry import DEFENSES

    steps = client_steps(config)
    out = [DEFENSES[s["name"]].Client(s) for s in steps if DEFENSES[s["name"]].Client is not None]
    listed = {s["name"] for s in steps}
    out += [cls.Client({"name": name}) for name, cls in DEFENSES.items()
            if name not in listed and cls.Client is not None and cls.Client.activated_by(config)]
    return out


def private_training(defenses: list[ClientDefense], state: RecordDict):
    """The in-training hook of this round's local training (DP-SGD's), else None."""
    return next((p for p in (d.private_training(state) for d in defenses) if p is not None), None)


def defend_upload(upload, defenses: list[ClientDefense], config: ConfigRecord, partition_id: int) -> dict[str, float]:
    """Apply the update transforms to ``upload``'s update in place, in order; their metrics."""
    transforms = [d for d in defenses if d.transforms()]
    if not transforms:
        return {}  # untouched: the weights travel exactly as trained
    gen = transform_generator(int(config["seed"]), int(config["server-round"]), partition_id)
    update, metrics = upload.delta(), {}
    for d in transforms:
        update, m = d.transform(update, gen, config)
        metrics.update(m)
    upload.weights = {k: (upload.sent[k] + update[k]).to(w.dtype) if k in update else w
                      for k, w in upload.weights.items()}
    return metrics


def defend_gradient(grads: dict[str, torch.Tensor], defenses: list[ClientDefense], config: ConfigRecord,
                    partition_id: int) -> dict[str, torch.Tensor]:
    """The audit's gradient answer through the same defenses, in the same order (its own noise draw)."""
    gen = transform_generator(int(config["seed"]), int(config["server-round"]), partition_id, audit=True)
    for d in defenses:
        grads = d.transform_gradient(grads, gen, config)
    return grads


def wrap_call(call, defenses: list[ClientDefense], config: ConfigRecord):
    """The client's train call inside every defense's wrapper (the first defense outermost)."""
    for d in reversed(defenses):
        call = d.wrap_call(call, config)
    return call


def reply_metrics(defenses: list[ClientDefense], config: ConfigRecord) -> dict[str, float]:
    return {k: v for d in defenses for k, v in d.reply_metrics(config).items()}
