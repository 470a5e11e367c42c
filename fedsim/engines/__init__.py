"""Engines: where the ClientApps run. Every call into Flower's runtime stays in this package.

- ``inline``: in-process Grid (tests, debugging, small runs).
- ``ray``: ClientApps in parallel Ray actors (``fedsim.engines.ray``; Ray itself: ``fedsim.engines.ray_cluster``).
- ``vectorized``: in-process, a round's clients trained together with torch.func (``fedsim.engines.vectorized``);
  each client's reply through the ClientApp's own reply path.
All run the same ``fedsim.run.apps.server_app`` and ``client_app``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, RecordDict

from ..scenario.schema import Scenario
from .identity import enter_server_identity

RUN_ID = 1


def server_context(scenario: Scenario, out_dir: Path, progress: bool, resume: bool = False,
                   tracking: dict | None = None) -> Context:
    run_config = {"scenario-yaml": scenario.to_yaml(), "out-dir": str(out_dir), "progress": progress,
                  "resume": resume}
    if tracking:  # run_config holds scalars only: the trackers' settings travel as JSON text
        run_config["tracking"] = json.dumps(tracking)
    return Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def run_scenario(scenario: Scenario, out_dir: str | Path, progress: bool = True, resume: bool = False,
                 tracking: dict | None = None) -> dict:
    """Run ``scenario`` on its engine; results land in ``out_dir``; returns summary.json's content.
    ``resume``: continue the run in ``out_dir`` from its checkpoint (``fedsim resume``). ``tracking``: where
    its trackers report, from a sweep (``fedsim.trackers.open_sweep``)."""
    from ..run.apps import client_app, server_app

    import torch

    out_dir = Path(out_dir)
    torch.set_num_threads(scenario.engine.torch_threads)
    enter_server_identity(RUN_ID)
    context = server_context(scenario, out_dir, progress, resume, tracking)
    client_config = {"scenario-yaml": context.run_config["scenario-yaml"]}
    if scenario.engine.name == "inline":
        from .inline import InlineGrid

        grid = InlineGrid(client_app, scenario.data.num_clients, client_config, RUN_ID)
        server_app(grid, context)
    elif scenario.engine.name == "vectorized":
        from .vectorized import VectorizedGrid

        grid = VectorizedGrid(client_app, scenario.data.num_clients, client_config, RUN_ID,
                              chunk=scenario.engine.vectorized.chunk)
        server_app(grid, context)
    else:
        from .ray import RayGrid

        with RayGrid(scenario.data.num_clients, client_config, scenario.engine.ray, RUN_ID,
                     torch_threads=scenario.engine.torch_threads,
                     vectorized_chunk=scenario.engine.vectorized.chunk if scenario.engine.ray.vectorized else None
                     ) as grid:
            server_app(grid, context)
    return json.loads((out_dir / "summary.json").read_text())
