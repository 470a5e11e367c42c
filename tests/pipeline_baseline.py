"""Per-round metrics of every strategy on one small scenario each, recorded before a change to the
round pipeline and compared after it (tests/test_pipeline_regression.py).

    python -m tests.pipeline_baseline          # rewrite tests/data/pipeline_baseline.json

Dropout, momentum, weight decay, partial participation and lr decay are on, so a change to
seeding, batch order, optimiser or sampling shows up in the numbers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.conftest import small_raw

PATH = Path(__file__).parent / "data" / "pipeline_baseline.json"
STRATEGIES = ("fedavg", "fedprox", "scaffold", "fedspeed", "fedce", "fedimpro")
VOLATILE = {"wall_s", "elapsed_s"}


def scenario_raw(name: str) -> dict:
    return small_raw(strategy={"name": name}, data__num_clients=5, train__rounds=3, train__participation=0.6,
                     train__local_epochs=2, train__batch_size=16, train__lr=0.05, train__lr_decay=0.9,
                     train__momentum=0.5, train__weight_decay=1e-3, model__dropout=0.1,
                     data__partition={"name": "dirichlet", "alpha": 0.5})


def run(name: str, engine: str = "inline") -> list[dict]:
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics
    from fedsim.scenario import parse_scenario

    raw = scenario_raw(name)
    if engine == "ray":
        raw["engine"] = {"name": "ray", "ray": {"num_actors": 2}}
    with tempfile.TemporaryDirectory() as out:
        run_scenario(parse_scenario(raw), out, progress=False)
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in read_metrics(out)]


def main() -> None:
    PATH.write_text(json.dumps({name: run(name) for name in STRATEGIES}, indent=1) + "\n")
    print(f"wrote {PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
