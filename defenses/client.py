"""The client's side of every defense, read from the training (or audit query) message alone.

The server puts the ordered list of client-side defense steps in the config under
``defenses`` (JSON, each step a defense's settings with its ``name``); a client applies
them in that order: ``dp_sgd`` changes local training itself (``private_training``), and
``clip``, ``prune``, ``noise`` transform the update after training, before the codec
(``defend_upload``), and the audit's gradient answer the same way (``defend_gradient``).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from . import upload_transforms as ut

DEFENSES_KEY = "defenses"


def client_steps(config: ConfigRecord | dict) -> list[dict[str, Any]]:
    return json.loads(str(config[DEFENSES_KEY])) if DEFENSES_KEY in config else []


def private_training(config: ConfigRecord | dict, state: RecordDict):
    """Opacus DP-SGD for this round's local training when the message asks for it, else None."""
    from .dp_sgd import PrivateTraining

    step = next((s for s in client_steps(config) if s["name"] == "dp_sgd"), None)
    return PrivateTraining(step, state) if step is not None else None


def transform(update: dict[str, torch.Tensor], steps: list[dict[str, Any]], generator: torch.Generator
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``update`` through the clip/prune/noise steps in order; metrics of what they did."""
    metrics: dict[str, float] = {}
    for step in steps:
        if step["name"] == "clip":
            update, clipped = ut.clip(update, float(step["max_norm"]))
            metrics["defense-update-clipped"] = float(clipped)
        elif step["name"] == "prune":
            update = ut.prune(update, float(step["ratio"]))
        elif step["name"] == "noise":
            update = ut.noise(update, float(step["variance"]), str(step["distribution"]), generator)
    return update, metrics


def _post_steps(config) -> list[dict[str, Any]]:
    return [s for s in client_steps(config) if s["name"] in ("clip", "prune", "noise")]


def defend_upload(upload, config: ConfigRecord, partition_id: int) -> dict[str, float]:
    """Apply the clip/prune/noise steps to ``upload``'s update in place; their metrics."""
    steps = _post_steps(config)
    if not steps:
        return {}  # untouched: the weights travel exactly as trained
    gen = ut.noise_generator(int(config["seed"]), int(config["server-round"]), partition_id)
    update, metrics = transform(upload.delta(), steps, gen)
    upload.weights = {k: (upload.sent[k] + update[k]).to(w.dtype) if k in update else w
                      for k, w in upload.weights.items()}
    return metrics


def defend_gradient(grads: dict[str, torch.Tensor], config: ConfigRecord, partition_id: int
                    ) -> dict[str, torch.Tensor]:
    """The audit's gradient answer through the same clip/prune/noise steps (own noise draw), then
    dp_user's client-side clipping (Flower's mod clips last, after the ClientApp's own steps)."""
    from .dp_user import QUERY_CLIP_KEY

    steps = _post_steps(config)
    if steps:
        gen = ut.noise_generator(int(config["seed"]), int(config["server-round"]), partition_id, audit=True)
        grads = transform(grads, steps, gen)[0]
    if QUERY_CLIP_KEY in config:
        grads = ut.clip(grads, float(config[QUERY_CLIP_KEY]))[0]
    return grads
