"""MLflow tracker (``output.trackers: [mlflow]``; ``pip install 'fedsim[mlflow]'``).

One MLflow run per fedsim run, in the experiment named after the scenario: the resolved scenario flattened
into params (``train.lr``, ``strategy.name`` ...), every number of each metrics.jsonl row as a metric with
the round as its step (nested fields dotted: ``train_metrics.train_loss``), the audit's worst PSNR (and SSIM,
label accuracy ...) of each audited round at that round's step, and as artifacts summary.json, the scenario,
metrics.jsonl, audit.jsonl, the audit's reconstructions (``audit/``), the curves and the run's report.html
(``fedsim.compare.report``). The audit's figures and the files are logged when the run ends: the attacks
run off the training path and finish out of order.

Where: ``MLFLOW_TRACKING_URI`` when it is set (a tracking server, a database); otherwise a store of the run's
own, under its folder: ``<run>/mlflow/mlflow.db`` (SQLite: MLflow 3 keeps its plain-file store in
maintenance mode and refuses it unless told) with the artifacts in ``<run>/mlflow/artifacts``, read with
``mlflow ui --backend-store-uri sqlite:///<run>/mlflow/mlflow.db``. No server, no network.

A run resumed (``fedsim resume``) continues the same MLflow run (its id is the tracker's checkpointed state);
rounds redone after the checkpoint are logged again at the same steps. A sweep (``fedsim sweep``) is one
parent MLflow run in the experiment named after the sweep, in the sweep's store (``<sweep>/mlflow/``, or
``MLFLOW_TRACKING_URI``), with a child run per scenario (``mlflow.parentRunId``); the parent holds runs.csv
and the sweep's report, and a re-run of the sweep reopens the same parent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .base import Tracker, audit_by_round, numbers

STORE = "mlflow"  # the folder of a run's (or sweep's) own MLflow store
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's limits per log_batch call
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param's value


def _client(uri: str):
    # MLflow 3 sends usage telemetry by default; fedsim sends none (Flower's is off too), unless the user says so.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    # A new SQLite store logs its schema migration at INFO on every first use: fedsim reports the run itself.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def local_uri(folder: Path) -> str:
    """The URI of the MLflow store of ``folder`` (a run's or a sweep's), created if need be."""
    (folder / STORE).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / STORE / 'mlflow.db').resolve()}"


def _forget(uri: str) -> None:
    """Drop what MLflow keeps per store URI for the life of the process (the store, its database engine and
    pooled connections). A run's own store is new with each run in its folder: after ``--overwrite`` (or
    ``fedsim.run(..., overwrite=True)`` again in a notebook) the file at the same path is another one, and a
    connection kept to the removed file fails as "attempt to write a readonly database". MLflow has no
    public call for this; tests/test_trackers.py runs a folder twice in one process to catch a change."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()
    _tracking_store_registry._get_store_with_resolved_uri.cache_clear()


def _store(folder: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): ``MLFLOW_TRACKING_URI``'s (its own artifact
    root), else ``folder``'s own store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return local_uri(folder), (folder / STORE / "artifacts").resolve().as_uri()


def _experiment(client, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric or param name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:250]


def scenario_params(scenario) -> dict[str, str]:
    """The resolved scenario as MLflow params: one per leaf key, dotted (``data.partition.alpha``); a list
    or mapping that is a value (``model.hidden``, an attack's settings) as JSON."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[key(prefix)] = text[:PARAM_VALUE_MAX]

    walk("", scenario.model_dump(mode="json"))
    return params


def _now_ms() -> int:
    return int(time.time() * 1000)


class MLflowTracker(Tracker):
    state_key = "tracker.mlflow"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.uri: str | None = self.tracking.get("tracking_uri")
        self.run_id: str | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def on_start(self, arrays) -> None:
        from mlflow.entities import Param

        if self.tracking:  # a sweep's run: its experiment, under its parent run
            experiment = self.tracking["experiment_id"]
            tags = {"mlflow.parentRunId": self.tracking["parent_run_id"]}
        else:
            self.uri, artifacts = _store(self.out_dir)
            if artifacts is not None:  # the run's own store: made for this run (module docstring)
                _forget(self.uri)
            experiment, tags = _experiment(self.client, self.scenario.name, artifacts), {}
        tags["fedsim.run_dir"] = str(self.out_dir.resolve())
        self.run_id = self.client.create_run(experiment, run_name=self.out_dir.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in scenario_params(self.scenario).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH_PARAMS])

    def on_round(self, record) -> None:
        self._log_metrics([(key(name), value) for name, value in numbers(record.row, ".")], record.server_round)

    def _log_metrics(self, values: list[tuple[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(name, value, now, step) for name, value in values]
        for i in range(0, len(metrics), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH_METRICS])

    def state_dict(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reopen the run the checkpoint names, in the store it was in (whatever the environment says now)."""
        self.uri, self.run_id, self._client = state["tracking_uri"], state["run_id"], None
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, summary: dict[str, Any]) -> None:
        from ..compare.report import write_report

        for server_round, figures in audit_by_round(self.audit_rows()).items():
            self._log_metrics([(f"audit.{k}", v) for k, v in figures.items()], server_round)
        write_report(self.out_dir)
        for name in ("summary.json", "scenario.yaml", "metrics.jsonl", "audit.jsonl", "report.html",
                     "accuracy.png", "audit_psnr.png"):
            if (self.out_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out_dir / name))
        if (self.out_dir / "audit").is_dir() and any((self.out_dir / "audit").iterdir()):
            self.client.log_artifacts(self.run_id, str(self.out_dir / "audit"), "audit")
        self.client.set_terminated(self.run_id, "FINISHED")

    def stopped(self, error: BaseException) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


# ----------------------------------------------------------------------------- a sweep's parent run


def open_sweep(name: str, root: Path) -> dict[str, Any]:
    """The sweep's parent run (created, or the one an earlier invocation of the same sweep made, reopened):
    what each of its runs' trackers needs to report under it."""
    uri, artifacts = _store(root)
    client = _client(uri)
    experiment = _experiment(client, name, artifacts)
    earlier = client.search_runs([experiment], filter_string=f"tags.`fedsim.sweep` = '{name}'", max_results=1)
    if earlier:
        parent = earlier[0].info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(experiment, run_name=name, tags={"fedsim.sweep": name}).info.run_id
    return {"tracking_uri": uri, "experiment_id": experiment, "parent_run_id": parent}


def close_sweep(settings: dict[str, Any], root: Path, failed: bool) -> None:
    client = _client(settings["tracking_uri"])
    parent = settings["parent_run_id"]
    for name in ("sweep.yaml", "runs.csv", "report.html"):
        if (root / name).is_file():
            client.log_artifact(parent, str(root / name))
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")
