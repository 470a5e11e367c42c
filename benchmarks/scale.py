"""Scale: what 100,000 clients cost against 1,000 clients of the same data.

Workload: synthetic data (200,000 training and 1,000 test images, 10 classes, 8x8, 1
channel), split IID over 1,000 / 10,000 / 100,000 clients, val_fraction 0.1; 100 clients
train per round (participation = 100 / clients, fixed sampling), 1 round, 1 local epoch,
batch 32, MLP 64-64-10, FedAvg, inline engine, central evaluation. IID with 200,000
samples gives every client at least 2 samples, and val_fraction 0.1 of 2 samples is 1
validation and 1 training sample, so no client is empty at 100,000 (a Dirichlet split
would leave some clients too few samples). The 1,000-client run's 100 clients train on
~180 samples each, the 100,000-client run's on 1 each: the difference in time is what the
number of clients costs, not the training.

Each size runs in its own subprocess (its own interpreter, so peak memory is its own),
which builds the world (data set and every client's split) through
``fedsim.world.world_from_text`` as the CLI's data check does, then runs the scenario
through ``fedsim.engines.run_scenario`` (reusing that world, as ``python -m fedsim`` does).
Measured: process wall time from spawn to exit, world build time, the round's wall time
(metrics.jsonl ``wall_s``: sampling, 100 clients' training, aggregation, central
evaluation), peak RSS (``ru_maxrss``), the RSS after imports (before any data) and at the
end of the run (what stays: data, client splits, node contexts; the peak also holds the
data generator's temporaries). Sizes run in turn, ``--repeat`` times; the table shows the
median of each figure (the first process after a pause is slower; repeats hide that).

Targets: a 100,000-client run costs at most 1.5x the 1,000-client run, and its memory is dominated by
the data (issue 8); a 1,000,000-client run on 2,000,000 samples (``--clients 1000,1000000 --train
2000000``) costs at most 2x the 1,000-client run on the same data and stays under 4 GB resident
(issue 23; measured 2026-12-07 on 2 loaded CPUs: 1.10x, peak 1,782 MB for 504 MB of data).
Usage: python benchmarks/scale.py [--clients 1000,10000,100000] [--train 200000] [--repeat 3] [--partition iid]
       [--val-fraction 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0
TRAIN, TEST, SIZE = 200_000, 1_000, 8
PER_ROUND = 100
CLIENTS = (1_000, 10_000, 100_000)


def scenario_raw(num_clients: int, partition: str, val_fraction: float, train: int = TRAIN) -> dict:
    return {
        "name": f"scale-{num_clients}", "seed": SEED,
        "data": {"dataset": "synthetic", "num_clients": num_clients, "val_fraction": val_fraction,
                 "partition": {"name": partition},
                 "synthetic": {"classes": 10, "channels": 1, "size": SIZE, "train": train, "test": TEST}},
        "model": {"name": "mlp", "hidden": [64]},
        "strategy": {"name": "fedavg"},
        "train": {"rounds": 1, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                  "participation": PER_ROUND / num_clients, "sampling": "fixed"},
        "engine": {"name": "inline"},
        "output": {"plot": False, "progress": False},
    }


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_now_mb() -> float:
    try:  # resident pages, second field of /proc/self/statm (Linux)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- child


def run_child(num_clients: int, partition: str, val_fraction: float, train: int, out: Path) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario
    from fedsim.world import world_from_text

    base_mb = max_rss_mb()
    scenario = parse_scenario(scenario_raw(num_clients, partition, val_fraction, train))
    t0 = time.perf_counter()
    world = world_from_text(scenario.to_yaml())
    build_s = time.perf_counter() - t0
    ds = world.dataset
    data_mb = sum(t.numel() * t.element_size() for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)) / 2**20
    summary = run_scenario(scenario, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print("RESULT " + json.dumps({"build_s": build_s, "round_s": rows[-1]["wall_s"], "base_mb": base_mb,
                                  "peak_mb": max_rss_mb(), "end_mb": rss_now_mb(), "data_mb": data_mb,
                                  "accuracy": summary["accuracy"]}), flush=True)


# ----------------------------------------------------------------------------- parent


def spawn(num_clients: int, partition: str, val_fraction: float, train: int, tmp: Path) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, __file__, "--child", str(num_clients), "--partition", partition,
           "--val-fraction", str(val_fraction), "--train", str(train), "--out", str(tmp / f"out-{num_clients}")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{num_clients} clients failed (exit {proc.returncode})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return {"wall": wall, **json.loads(lines[-1][len("RESULT "):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="comma-separated client counts")
    ap.add_argument("--repeat", type=int, default=3, help="processes per size; the table shows medians")
    ap.add_argument("--partition", default="iid", help="data.partition.name (default iid)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--train", type=int, default=TRAIN, help=f"training samples (default {TRAIN:,}; the "
                    "million-client case: --clients 1000,1000000 --train 2000000)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        return run_child(args.child, args.partition, args.val_fraction, args.train, args.out)

    sizes = [int(c) for c in args.clients.split(",") if c]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for n in sizes:
                runs[n].append(spawn(n, args.partition, args.val_fraction, args.train, Path(tmp)))
                print(f"  {n:7d} clients {runs[n][-1]['wall']:6.1f} s", file=sys.stderr, flush=True)
    results = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}

    ref = results[sizes[0]]
    print(f"\nScale: synthetic {args.train:,} x {SIZE}x{SIZE}x1, {args.partition}, val_fraction {args.val_fraction}, "
          f"{PER_ROUND} clients/round, 1 round, MLP {SIZE * SIZE}-64-10, inline, {os.cpu_count()} CPUs, "
          f"median of {args.repeat}")
    print(f"{'clients':>8s} {'wall s':>7s} {'x ref':>6s} {'build s':>8s} {'x ref':>6s} {'round s':>8s} "
          f"{'x ref':>6s} {'peak MB':>8s} {'x ref':>6s} {'end MB':>7s} {'base MB':>8s} {'data MB':>8s}")
    for n, r in results.items():
        print(f"{n:8d} {r['wall']:7.1f} {r['wall'] / ref['wall']:6.2f} {r['build_s']:8.2f} "
              f"{r['build_s'] / ref['build_s']:6.2f} {r['round_s']:8.2f} {r['round_s'] / ref['round_s']:6.2f} "
              f"{r['peak_mb']:8.0f} {r['peak_mb'] / ref['peak_mb']:6.2f} {r['end_mb']:7.0f} {r['base_mb']:8.0f} "
              f"{r['data_mb']:8.0f}")
    print(f"x ref: against the {sizes[0]:,}-client run. wall: spawn to exit. build: data set and every "
          "client's split. round: one round's wall_s. peak: ru_maxrss; end: RSS at the end; base: RSS "
          "after imports; data: the data set's tensors.")
    big = results[sizes[-1]]
    ratio = big["wall"] / ref["wall"]
    target = 2.0 if sizes[-1] >= 1_000_000 else 1.5
    print(f"{sizes[-1]:,}/{sizes[0]:,} wall = {ratio:.2f} (target <= {target}: {'met' if ratio <= target else 'MISSED'}); "
          f"peak above imports {big['peak_mb'] - big['base_mb']:.0f} MB, at the end "
          f"{big['end_mb'] - big['base_mb']:.0f} MB, for {big['data_mb']:.0f} MB of data; peak resident "
          f"{big['peak_mb']:.0f} MB (target < 4096 MB: {'met' if big['peak_mb'] < 4096 else 'MISSED'})")


if __name__ == "__main__":
    main()
