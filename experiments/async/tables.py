"""Table and plot of the asynchronous sweep (experiments/async/RESULTS.md), from its run folders.

    .venv/bin/python -m fedsim sweep experiments/async/sweep.yaml --workers 2 --out runs/async
    .venv/bin/python experiments/async/tables.py runs/async

Per method, mean ± sd over the seeds: central test accuracy at fixed virtual-time budgets (the last
evaluation at or before the budget) and the best evaluation by the last budget, the virtual time to first
reach each target accuracy by the last budget (with how many seeds reached it), the steps (rounds or
server steps) run in the last budget, the staleness of the updates aggregated, and for staleness: invert
the updates inverted and their mean wall time. Draws accuracy against virtual time (mean over seeds,
band: min to max; a curve starts at every seed's first evaluation) to accuracy_time.png here.
Copies the sweep's runs.csv here.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent

from experiments.uploads.tables import ms, rows, run_files  # noqa: E402  (the installed package)

BUDGETS = (10.0, 20.0, 40.0, 60.0)   # virtual seconds
TARGETS = (0.5, 0.6, 0.7)           # central test accuracy


def method(r: dict) -> str:
    s = json.loads(r["strategy"]) if r["strategy"].startswith("{") else {"name": r["strategy"]}
    name = s["name"]
    if name == "fedavg":
        deadline = r.get("train.deadline_s") or ""
        return "FedAvg (sync)" if deadline in ("", "None", "null") else f"FedAvg, deadline {float(deadline):g} s"
    if name == "fedasync":
        return "FedAsync"
    if s.get("staleness") == "invert":
        return f"FedBuff + invert (server time: {s.get('invert_time', 'wall')})"
    return "FedBuff, unweighted" if s.get("staleness") == "constant" else "FedBuff"


def accuracy_at(metrics: list[dict], t: float) -> float | None:
    """The last evaluation at or before ``t``; None when the run ended before ``t`` (it says nothing there)."""
    if not metrics or metrics[-1]["virtual_time_s"] < t:
        return None
    seen = [m["accuracy"] for m in metrics if m["virtual_time_s"] <= t]
    return seen[-1] if seen else None


def best_by(metrics: list[dict], t: float) -> float | None:
    """The best evaluation up to ``t`` (None when the run ended before ``t``)."""
    if not metrics or metrics[-1]["virtual_time_s"] < t:
        return None
    return max(m["accuracy"] for m in metrics if m["virtual_time_s"] <= t)


def seeds_said(fmt, values: list, spec: str) -> str:
    """``fmt`` of the values that exist, saying how many seeds they are when some are missing."""
    got = [v for v in values if v is not None]
    return fmt(got, spec) + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)")


def time_to(metrics: list[dict], target: float, horizon: float = BUDGETS[-1]) -> float | None:
    """The first virtual time the accuracy reached ``target``, within the common ``horizon`` (runs go on
    to different times past it); None: not by then."""
    return next((m["virtual_time_s"] for m in metrics if m["accuracy"] >= target and m["virtual_time_s"] <= horizon),
                None)


def collect(root: Path) -> dict[str, dict[str, list[dict]]]:
    by: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for r in rows(root):
        _, metrics, _ = run_files(root, r["run"])
        by[method(r)][r["seed"]] = metrics
    return by


def table(by: dict[str, dict[str, list[dict]]]) -> str:
    head = ("| method | " + " | ".join(f"acc @ {t:g} s" for t in BUDGETS) + f" | best by {BUDGETS[-1]:g} s | "
            + " | ".join(f"time to {a:.0%} (s, by {BUDGETS[-1]:g})" for a in TARGETS)
            + " | steps in 60 s | staleness, mean (max) | inverted in 60 s | inversion wall s |")
    lines = [head, "|---|" + "---|" * (len(BUDGETS) + len(TARGETS) + 5)]
    for name, seeds in by.items():
        runs = list(seeds.values())
        accs = [seeds_said(ms, [accuracy_at(m, t) for m in runs], "{:.3f}") for t in BUDGETS]
        best = seeds_said(ms, [best_by(m, BUDGETS[-1]) for m in runs], "{:.3f}")
        times = []
        for a in TARGETS:
            reached = [time_to(m, a) for m in runs]
            got = [t for t in reached if t is not None]
            times.append(ms(got) + ("" if len(got) == len(runs) else f" ({len(got)}/{len(runs)} seeds)")
                         if got else f"not reached (0/{len(runs)})")
        in_budget = [[m for m in run if m["virtual_time_s"] <= BUDGETS[-1]] for run in runs]
        steps = ms([len(b) for b in in_budget], "{:.0f}")
        stale = [s for b in in_budget for m in b for s in m.get("staleness", [])]
        staleness = f"{statistics.mean(stale):.1f} ({max(stale)})" if stale else "- (synchronous)"
        inverted = ms([sum(m.get("inverted") or 0 for m in b) for b in in_budget], "{:.0f}") \
            if any("inverted" in m for b in in_budget for m in b) else "-"
        walls = [m["invert_wall_s"] for b in in_budget for m in b if m.get("invert_wall_s") is not None]
        wall = f"{statistics.mean(walls):.2f}" if walls else "-"
        lines.append(f"| {name} | " + " | ".join(accs) + f" | {best} | " + " | ".join(times)
                     + f" | {steps} | {staleness} | {inverted} | {wall} |")
    return "\n".join(lines)


def plot(by: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0.0, BUDGETS[-1], 301)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, seeds in by.items():
        curves = np.array([[accuracy_at(m, t) for t in grid] for m in seeds.values()], dtype=float)  # None: nan
        line, = ax.plot(grid, curves.mean(axis=0), label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.1)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("central test accuracy")
    ax.set_title("digits, slow devices (10x) hold classes 7-9: accuracy against virtual time", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str) -> None:
    root = Path(out) / "async"
    by = collect(root)
    print(table(by))
    plot(by, HERE / "accuracy_time.png")
    shutil.copyfile(root / "runs.csv", HERE / "runs.csv")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/async")
