"""Run FedAvg, FedProx, SCAFFOLD, FedSpeed, FedCE and FedImpro on a strongly non-IID split.

    python experiments/run_strategies.py [--seeds 0 1 2] [--jobs 2] [--rounds N]

Scenario: experiments/strategies_noniid.yaml (digits, 20 clients, per-class Dirichlet 0.1,
half the clients per round). Each method runs with its reference defaults, three seeds
(the seed changes the split, the initial model, the sampling and local training).
Writes experiments/results/strategies_noniid.{md,png,json}: mean and std over seeds of
final and best accuracy, and the rounds each method needs to reach FedAvg's best
(the mean over seeds of FedAvg's best accuracy). Per-run outputs go to
runs/strategies_noniid/<method>/seed<k>/. ``--variants`` adds diagnostic FedSpeed runs;
``--reference`` adds FedSpeed, FedCE and FedImpro with ``fidelity: reference`` (the official code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "experiments" / "strategies_noniid.yaml"
RESULTS = ROOT / "experiments" / "results"

METHODS: dict[str, list[str]] = {
    "FedAvg": ["strategy.name=fedavg"],
    "FedProx": ["strategy.name=fedprox"],
    "SCAFFOLD": ["strategy.name=scaffold"],
    "FedSpeed": ["strategy.name=fedspeed"],
    "FedCE": ["strategy.name=fedce"],
    "FedImpro": ["strategy.name=fedimpro"],
}
# Diagnostics for FedSpeed (why it does or does not beat FedAvg here), not tuned baselines.
VARIANTS: dict[str, list[str]] = {
    "FedSpeed, code server correction": ["strategy.name=fedspeed", "strategy.server_correction=all"],
    "FedSpeed, example weighting": ["strategy.name=fedspeed", "strategy.weighting=examples"],
    "FedSpeed, lamb 0 (local SAM only)": ["strategy.name=fedspeed", "strategy.lamb=0"],
    "FedSpeed, rho 0 (prox-correction only)": ["strategy.name=fedspeed", "strategy.rho=0"],
}

# The official code of each method (strategy hyperparameter ``fidelity: reference``), beside the defaults.
REFERENCE: dict[str, list[str]] = {
    "FedSpeed, reference code": ["strategy.name=fedspeed", "strategy.fidelity=reference"],
    "FedCE, reference code": ["strategy.name=fedce", "strategy.fidelity=reference"],
    "FedImpro, reference code": ["strategy.name=fedimpro", "strategy.fidelity=reference"],
}


def run_one(job: tuple[str, list[str], int, int | None, str]) -> dict:
    method, overrides, seed, rounds, out = job
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.path.insert(0, str(ROOT))
    from fedsim.engines import run_scenario
    from fedsim.results import read_metrics
    from fedsim.scenario import load_scenario

    sets = [*overrides, f"seed={seed}"] + ([f"train.rounds={rounds}"] if rounds else [])
    scenario = load_scenario(SCENARIO, sets)
    start = time.perf_counter()
    summary = run_scenario(scenario, out, progress=False)
    rows = read_metrics(out)
    return {"method": method, "seed": seed, "wall_s": time.perf_counter() - start,
            "accuracy": [r["accuracy"] for r in rows], "bytes_up": summary["bytes_up_total"],
            "bytes_down": summary["bytes_down_total"],
            "acc_spread": [r.get("acc_spread") for r in rows] if "acc_spread" in rows[0] else None}


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
        methods = {m: o for m, o in methods.items() if o[0].split("=", 1)[1] in keep}
    jobs = [(m, o, s, args.rounds, str(ROOT / "runs" / args.name / m.replace(" ", "_").replace(",", "")
                                       / f"seed{s}")) for m, o in methods.items() for s in args.seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = []
        for r in pool.map(run_one, jobs):
            runs.append(r)
            print(f"{r['method']:40s} seed {r['seed']}: final {r['accuracy'][-1]:.4f} best {max(r['accuracy']):.4f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
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
