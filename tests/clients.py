"""Calling a client algorithm directly, as fedsim's ClientApp does (without the message)."""

from __future__ import annotations

from flwr.app import RecordDict

from strategies import ClientJob, Upload


def train_client(algorithm, model, data, settings, content: RecordDict | None = None,
                 state: RecordDict | None = None) -> Upload:
    """Train ``model`` (holding the global weights) in place; returns the algorithm's Upload."""
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    job = ClientJob(model, data, settings, content if content is not None else RecordDict(),
                    state if state is not None else RecordDict(), sent)
    return algorithm.train(job)
