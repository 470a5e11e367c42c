"""The canary estimate's 95% lower bound (``epsilon_est``) against the accountant, per round, on the sweep's
dp_user arms (experiments/privacy/RESULTS.md, "The lower bound"): base.yaml without the audit (the audit
changes no training), z 0.5 / 1 / 2, final and all_iterates, seeds 0 and 1; prints the table.

    .venv/bin/python experiments/privacy/bound_check.py      # 12 runs, ~1.5 min on an idle 2-core machine
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from pathlib import Path

import yaml

from fedsim.engines import run_scenario
from fedsim.run.results import read_metrics
from fedsim.scenario import parse_scenario

HERE = Path(__file__).parent


def value(x: float | None) -> float:
    return math.inf if x is None else x  # metrics.jsonl writes an unbounded figure as None


def main() -> None:
    base = yaml.safe_load((HERE / "base.yaml").read_text())
    base["audit"] = "none"
    print("| z | threat | figure | " + " | ".join(f"round {t}" for t in range(1, 11)) + " |")
    print("|---|---|---|" + "---|" * 10)
    above = 0
    for z in (0.5, 1.0, 2.0):
        for threat in ("final", "all_iterates"):
            runs = []
            for seed in (0, 1):
                raw = copy.deepcopy(base)
                raw.update(seed=seed, defense={"name": "dp_user", "clipping": "client", "clipping_norm": 1.0,
                                               "noise_multiplier": z})
                raw["privacy"]["threat"] = threat
                with tempfile.TemporaryDirectory() as out:
                    run_scenario(parse_scenario(raw), out, progress=False)
                    runs.append(read_metrics(out))
            above += sum(1 for rows in runs for r in rows if value(r["epsilon_est"]) > r["epsilon"])
            cells = {"accountant": [f"{r['epsilon']:.2f}" for r in runs[0]],
                     "lower bound, mean / max": [
                         f"{statistics.mean(value(r[t]['epsilon_est']) for r in runs):.2f} / "
                         f"{max(value(r[t]['epsilon_est']) for r in runs):.2f}" for t in range(10)],
                     "point estimate, mean": [
                         f"{statistics.mean(value(r[t]['epsilon_est_point']) for r in runs):.2f}" for t in range(10)]}
            for i, (name, row) in enumerate(cells.items()):
                lead = f"| {z:g} | {threat} |" if i == 0 else "| | |"
                print(f"{lead} {name} | " + " | ".join(row) + " |")
    print(f"\nrounds whose lower bound is above the accountant's epsilon: {above} of 120")


if __name__ == "__main__":
    main()
