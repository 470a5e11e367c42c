"""Sweep scaling: the same 8 compute-bound runs with 1 worker and with 2 (and more where cores allow).

Each run: digits, 10 IID clients, MLP 64-256-10, FedAvg, 3 local epochs of batch 8, 60
rounds, engine inline, one torch thread (a run is one process's worth of compute), the
8 runs differing only in their seed. Each worker count runs the whole sweep from nothing in
its own folder by ``python -m fedsim sweep`` (a subprocess, so Ray starts and stops in
it), timed from spawn to exit, so Ray's start-up is in the figure.

Target: speed-up at least 0.8 x workers on these runs, so that a cluster scales the same way.
A sweep has a fixed cost besides its runs (validating and loading every run's data up front,
Ray's start, the report: ~14 s for 8 runs here), so runs of a few seconds scale worse (15
rounds: 1.06x with 2 workers); at 60 rounds (~12 s a run) the runs dominate.
Usage: python benchmarks/sweep.py [--runs 8] [--workers 1 2] [--rounds 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def scenario(rounds: int) -> dict:
    return {"name": "bench", "data": {"dataset": "digits", "num_clients": 10, "partition": {"name": "iid"}},
            "model": {"name": "mlp", "hidden": [256]}, "strategy": {"name": "fedavg"},
            "train": {"rounds": rounds, "local_epochs": 3, "batch_size": 8, "lr": 0.05},
            "engine": {"name": "inline", "torch_threads": 1}, "output": {"plot": False, "progress": False}}


def time_sweep(folder: Path, runs: int, workers: int, rounds: int) -> float:
    (folder / "base.yaml").write_text(yaml.safe_dump(scenario(rounds)))
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"name": "bench", "base": "base.yaml",
                                                      "grid": {"seed": list(range(runs))}}))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedsim", "sweep", str(folder / "sweep.yaml"), "--workers", str(workers),
                    "--out", str(folder / "out"), "--quiet"], check=True, env=env, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    print(f"{args.runs} runs, cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'workers':>7}  {'wall s':>7}  {'speed-up':>8}  {'/workers':>8}")
    base = None
    for w in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            wall = time_sweep(Path(tmp), args.runs, w, args.rounds)
        base = base or wall * args.workers[0]
        speedup = base / wall
        print(f"{w:>7}  {wall:>7.1f}  {speedup:>8.2f}  {speedup / w:>8.2f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
