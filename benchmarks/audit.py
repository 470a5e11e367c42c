"""Audit cost: an audited run against training alone plus the audits alone, on both engines.

Workload: digits upsampled to 16x16, LeNet (DLG's sigmoid LeNet, uniform init), 300 clients
(5-6 samples each), 6 clients a round (participation 0.02), 1 local epoch of batch 4, FedAvg,
10 rounds; the audit attacks one participant's upload every 2nd round (rounds 2, 4, 6, 8, 10)
with unrolled Inverting Gradients (update threat, 300 iterations, the convergence stop on).
Three ways, each in its own process, wall time from spawn to exit:

  train     the scenario without the audit (`python -m fedsim S.yaml --quiet`)
  audited   the scenario with the audit (the attacks run while training goes on: a process of
            their own on inline, a Ray actor on ray)
  audits    the same attack jobs alone: a process runs the audited scenario with the attack
            submissions collected instead of run (not timed), then runs those jobs one after
            another in a freshly spawned worker process, timed from the worker's spawn (the
            audited run pays that start-up too) to the last result

Target (issue 9): audited <= train + audits; on the ray engine with a core to spare, less
(the audit overlaps training). With 2 cores and 2 actors there is no spare core, so the
ray engine is measured with 1 actor too.
Usage: python benchmarks/audit.py [--engines inline,ray] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def scenario(engine: str, actors: int | None, audit: bool) -> dict:
    raw = {
        "name": "audit-bench", "seed": 0,
        "data": {"dataset": "digits", "num_clients": 300, "image_size": 16, "partition": {"name": "iid"}},
        "model": {"name": "lenet", "init": "uniform"},
        "train": {"rounds": 10, "local_epochs": 1, "batch_size": 4, "lr": 0.05, "participation": 0.02},
        "engine": {"name": engine, **({"ray": {"num_actors": actors}} if actors else {})},
        "output": {"plot": False, "progress": False},
    }
    if audit:
        raw["audit"] = {"attack": "ig", "threat": "update", "every": 2, "clients": 1,
                        "attack_config": {"iterations": 300}}
    return raw


def collect_and_run_alone(path: Path) -> None:
    """Child: collect the audit's jobs from a run, then time them alone in a fresh worker."""
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    from fedsim import audit as audit_module
    from fedsim.engines import run_scenario
    from fedsim.scenario import load_scenario

    jobs = []

    class Collector:
        def submit(self, fn, job):
            jobs.append(job)
            done = Future()
            done.set_result({"round": job.server_round, "client": job.partition_id, "psnr": None})
            return done

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    original = audit_module.AuditObserver.__init__

    def collecting_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.pool.shutdown()
        self.pool = Collector()

    audit_module.AuditObserver.__init__ = collecting_init
    with tempfile.TemporaryDirectory() as out:
        run_scenario(load_scenario(path), out, progress=False)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = [pool.submit(audit_module.run_job, job).result() for job in jobs]
        wall = time.perf_counter() - start
    print("RESULT " + json.dumps({"wall": wall, "jobs": len(jobs), "attack_s": sum(r["wall_s"] for r in rows)}))


def spawn(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return wall, proc.stdout


def measure(engine: str, actors: int | None, tmp: Path) -> dict[str, float]:
    paths = {}
    for audit in (False, True):
        paths[audit] = tmp / f"{engine}-{actors}-{audit}.yaml"
        paths[audit].write_text(yaml.safe_dump(scenario(engine, actors, audit), sort_keys=False))
    # --overwrite: each repeat re-runs into the same folders (fedsim refuses a used folder otherwise)
    train, _ = spawn([sys.executable, "-m", "fedsim", str(paths[False]), "--quiet", "--out", str(tmp / "t"), "--overwrite"])
    audited, _ = spawn([sys.executable, "-m", "fedsim", str(paths[True]), "--quiet", "--out", str(tmp / "a"), "--overwrite"])
    _, out = spawn([sys.executable, __file__, "--child", str(paths[True])])
    alone = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    rows = [json.loads(line) for line in (tmp / "a" / "audit.jsonl").read_text().splitlines()]
    return {"train": train, "audited": audited, "audits": alone["wall"], "jobs": alone["jobs"],
            "attack_s": alone["attack_s"], "rows": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="inline,ray")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        collect_and_run_alone(args.child)
        return
    setups = []
    for engine in args.engines.split(","):
        setups += [(engine, None)] if engine == "inline" else [(engine, None), (engine, 1)]
    print(f"audit cost: LeNet 16x16 digits, 300 clients, 6 a round, 10 rounds, IG (update, 300 it) on one "
          f"client every 2nd round, {os.cpu_count()} CPUs")
    print(f"{'engine':<14}{'train s':>9}{'audits s':>10}{'sum s':>8}{'audited s':>11}{'audited/sum':>13}  jobs")
    with tempfile.TemporaryDirectory() as tmp:
        for engine, actors in setups:
            runs = [measure(engine, actors, Path(tmp)) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("train", "audited", "audits")}
            total = med["train"] + med["audits"]
            name = engine if actors is None else f"{engine} ({actors} actor)"
            print(f"{name:<14}{med['train']:>9.1f}{med['audits']:>10.1f}{total:>8.1f}{med['audited']:>11.1f}"
                  f"{med['audited'] / total:>13.2f}  {runs[0]['jobs']} (attacks {runs[0]['attack_s']:.1f} s)")
            assert runs[0]["rows"] == runs[0]["jobs"], "the audited run and the collected jobs differ"


if __name__ == "__main__":
    main()
