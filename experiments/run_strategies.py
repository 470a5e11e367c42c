"""Run FedAvg, FedProx, SCAFFOLD, FedSpeed, FedCE and FedImpro on a strongly non-IID split.

    python experiments/run_strategies.py [--seeds 0 1 2] [--jobs 2] [--rounds N]

The runs are a sweep (``fedsim.compare.sweep``; the same grid as experiments/sweeps/strategies_noniid.yaml,
which ``python -m fedsim sweep`` runs alone): a grid over the strategy block and the seed,
Ray tasks, resumable, its runs.csv and report.html under runs/sweeps/<name>/. This script
adds the table the sweep does not make (rounds to FedAvg's best).

Scenario: experiments/strategies_noniid.yaml (digits, 20 clients, per-class Dirichlet 0.1,
half the clients per round). Each method runs with its reference defaults, three seeds
(the seed changes the split, the initial model, the sampling and local training).
Writes experiments/results/strategies_noniid.{md,png,json}: mean and std over seeds of
final and best accuracy, and the rounds each method needs to reach FedAvg's best
(the mean over seeds of FedAvg's best accuracy). Per-run outputs go to
runs/sweeps/<name>/runs/<run>/. ``--variants`` adds diagnostic FedSpeed runs;
``--reference`` adds FedSpeed, FedCE and FedImpro with ``fidelity: reference`` (the official code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The repository first: experiments/ (this script's folder, sys.path[0]) holds folders named like
# fedsim's packages (experiments/defenses), which would shadow them as namespace packages.
sys.path.insert(0, str(ROOT))
SCENARIO = ROOT / "experiments" / "strategies_noniid.yaml"
RESULTS = ROOT / "experiments" / "results"

# Each method is a strategy block of the sweep (experiments/sweeps/strategies_noniid.yaml holds the same grid).
METHODS: dict[str, dict] = {
    "FedAvg": {"name": "fedavg"},
    "FedProx": {"name": "fedprox"},
    "SCAFFOLD": {"name": "scaffold"},
    "FedSpeed": {"name": "fedspeed"},
    "FedCE": {"name": "fedce"},
    "FedImpro": {"name": "fedimpro"},
}
# Diagnostics for FedSpeed (why it does or does not beat FedAvg here), not tuned baselines.
VARIANTS: dict[str, dict] = {
    "FedSpeed, code server correction": {"name": "fedspeed", "server_correction": "all"},
    "FedSpeed, example weighting": {"name": "fedspeed", "weighting": "examples"},
    "FedSpeed, lamb 0 (local SAM only)": {"name": "fedspeed", "lamb": 0},
    "FedSpeed, rho 0 (prox-correction only)": {"name": "fedspeed", "rho": 0},
}

# The official code of each method (strategy hyperparameter ``fidelity: reference``), beside the defaults.
REFERENCE: dict[str, dict] = {
    "FedSpeed, reference code": {"name": "fedspeed", "fidelity": "reference"},
    "FedCE, reference code": {"name": "fedce", "fidelity": "reference"},
    "FedImpro, reference code": {"name": "fedimpro", "fidelity": "reference"},
}


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def summarise(runs: list[dict], methods: list[str]) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    target = float(np.mean([max(r["accuracy"]) for r in by["FedAvg"]]))
    table = {}
    for m, rs in by.items():
        final = [r["accuracy"][-1] for r in rs]
        best = [max(r["accuracy"]) for r in rs]
        reach = [rounds_to(r["accuracy"], target) for r in rs]
        table[m] = {"final_mean": float(np.mean(final)), "final_std": float(np.std(final)),
                    "best_mean": float(np.mean(best)), "best_std": float(np.std(best)),
                    "rounds_to_target": reach, "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                    "bytes_up_mb": float(np.mean([r["bytes_up"] for r in rs]) / 1e6), "seeds": len(rs)}
    return {"target": target, "table": table}


def markdown(summary: dict, scenario_text: str, rounds: int) -> str:
    t = summary["target"]
    lines = [f"Digits, 20 clients, per-class Dirichlet(0.1), 10 clients per round, {rounds} rounds, MLP 64-128-128-10;",
             f"mean ± std over {next(iter(summary['table'].values()))['seeds']} seeds. "
             f"Target for 'rounds to FedAvg's best' = {t:.4f} (FedAvg's mean best).", "",
             "| method | final accuracy | best accuracy | rounds to FedAvg's best | upload MB / run | wall s / run |",
             "|---|---|---|---|---|---|"]
    for m, r in summary["table"].items():
        reach = r["rounds_to_target"]
        hit = [x for x in reach if x is not None]
        reach_s = (f"{np.mean(hit):.1f}" if hit else "never") + ("" if len(hit) == len(reach) else
                                                                  f" ({len(hit)}/{len(reach)} seeds)")
        lines.append(f"| {m} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | {r['best_mean']:.4f} ± "
                     f"{r['best_std']:.4f} | {reach_s} | {r['bytes_up_mb']:.2f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        curves = np.array([r["accuracy"] for r in runs if r["method"] == m])
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, label=m)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("digits, 20 clients, Dirichlet 0.1, 50% participation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="override train.rounds")
    ap.add_argument("--variants", action="store_true", help="also run FedSpeed diagnostic variants")
    ap.add_argument("--reference", action="store_true", help="also run the reference-code modes")
    ap.add_argument("--only", nargs="+", default=None, metavar="STRATEGY",
                    help="run only the methods of these strategies (e.g. fedavg fedspeed); fedavg is always run")
    ap.add_argument("--name", default="strategies_noniid", help="output file stem in experiments/results")
    args = ap.parse_args(argv)

    methods = dict(METHODS, **(VARIANTS if args.variants else {}), **(REFERENCE if args.reference else {}))
    if args.only:
        keep = {"fedavg", *args.only}
        methods = {m: block for m, block in methods.items() if block["name"] in keep}
    from fedsim.run.results import read_metrics
    from fedsim.compare.sweep import SweepFile, expand_runs, run_sweep

    sweep = SweepFile(name=args.name, base=str(SCENARIO), set={"train.rounds": args.rounds} if args.rounds else {},
                      grid={"strategy": list(methods.values()), "seed": args.seeds})
    start = time.perf_counter()
    root = run_sweep(sweep, expand_runs(sweep), ROOT / "runs" / "sweeps", workers=args.jobs)
    runs = []
    for run in expand_runs(sweep):
        method = next(m for m, block in methods.items() if block == run.values["strategy"])
        folder = root / "runs" / run.name
        summary = json.loads((folder / "summary.json").read_text())
        runs.append({"method": method, "seed": run.values["seed"], "wall_s": summary["wall_s"],
                     "accuracy": [r["accuracy"] for r in read_metrics(folder)],
                     "bytes_up": summary["bytes_up_total"], "bytes_down": summary["bytes_down_total"]})
    names = list(methods)
    summary = summarise(runs, names)
    import yaml

    rounds = args.rounds or yaml.safe_load(SCENARIO.read_text())["train"]["rounds"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = markdown(summary, SCENARIO.read_text(), rounds)
    out = {"scenario": str(SCENARIO.relative_to(ROOT)), "seeds": args.seeds, "rounds": rounds,
           "wall_s_total": time.perf_counter() - start, **summary, "runs": runs}
    for suffix, text in ((".md", md), (".json", json.dumps(out, indent=1))):
        path = RESULTS / f"{args.name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    plot(runs, names, RESULTS / f"{args.name}.png")
    print(md)
    print(f"total wall time {out['wall_s_total']:.0f} s")


if __name__ == "__main__":
    main()
