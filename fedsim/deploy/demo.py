"""`make deploy-demo`: a TLS SuperLink with SuperNode authentication and three SuperNodes on
127.0.0.1, as real processes, running a short scenario with `flwr run`.

    python -m fedsim.deploy.demo [--workdir DIR] [--rounds N] [--keep]

- alice: registered, partition 0 of the scenario's data set: trains.
- bob: registered, its own data at a ``data-path`` holding a truncated MNIST IDX file:
  answers every round with an error reply carrying the reason; the server records it.
- mallory: a valid key that was never registered: the SuperLink refuses it.

Prints the per-round result table and the failures, and stops every process it started
(by PID, process group by process group), also on Ctrl-C or SIGTERM. Exit code 0 when the
run finished as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from .cluster import Cluster, wait_for

REFUSED = "Failed to activate SuperNode"


def demo_scenario(rounds: int = 3, num_clients: int = 2) -> dict:
    return {"name": "deploy-demo", "seed": 0, "data": {"dataset": "digits", "num_clients": num_clients},
            "model": {"name": "mlp", "hidden": [32]}, "train": {"rounds": rounds, "local_epochs": 1},
            "engine": {"timeout_s": 120}, "output": {"plot": False, "progress": False}}


def write_broken_mnist(root: Path) -> Path:
    """A folder of MNIST IDX files whose training images are truncated (malformed data)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def idx(path: Path, a: np.ndarray, cut: int = 0) -> None:
        raw = (bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
               + a.astype(np.uint8).tobytes())
        path.write_bytes(raw[: len(raw) - cut])
    idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), cut=100)
    idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, 20))
    idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5))
    return root


def refused(cluster: Cluster, name: str, timeout: float = 60) -> tuple[int, str]:
    """Wait until SuperNode ``name`` has been refused and exited: (exit code, the reason line)."""
    proc = next(p for p in cluster.procs if p.name == name)
    wait_for(lambda: proc.popen.poll() is not None, timeout, lambda: f"{name} was not refused:\n{proc.text()[-1500:]}")
    lines = [ln for ln in proc.text().splitlines() if REFUSED in ln or "Exit Code" in ln]
    reason = " / ".join(ln.split("m:", 1)[-1].strip() if "m:" in ln else ln.strip() for ln in lines)
    return proc.popen.returncode, reason


def table(rows: list[dict]) -> str:
    out = [f"{'round':>5} {'accuracy':>9} {'loss':>8} {'participants':>12} {'failures':>8} {'bytes_up':>10}"]
    for r in rows:
        out.append(f"{r['round']:>5} {r['accuracy']:>9.4f} {r['loss']:>8.4f} {r['participants']:>12} "
                   f"{r['failures']:>8} {r['bytes_up']:>10}")
    return "\n".join(out)


def run_demo(workdir: Path, rounds: int = 3, log=print) -> dict:
    """Start, run, report, stop. Returns {'rows', 'failures', 'refused', 'wall_s'}."""
    t0 = time.perf_counter()
    cluster = Cluster(workdir, tls=True, auth=True)

    def interrupted(signum, frame):  # SIGTERM stops the processes like Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        log(f"SuperLink on https://{cluster.address} (TLS: certs in {cluster.certs}; SuperNode auth on)")
        cluster.start_superlink()
        for name in ("alice", "bob"):
            cluster.register(name)
        cluster.node_key("mallory")  # a valid key, never registered
        log("registered: alice, bob; not registered: mallory")
        broken = write_broken_mnist(cluster.workdir / "bob-data")
        cluster.start_supernode("alice", "partition-id=0")
        cluster.start_supernode("bob", f'partition-id=1 data-path="{broken}"')
        cluster.start_supernode("mallory", "partition-id=0")
        cluster.wait_online(["alice", "bob"])
        code, why = refused(cluster, "mallory")
        log(f"mallory refused (exit code {code}): {why}")
        scenario = cluster.workdir / "scenario.yaml"
        scenario.write_text(yaml.safe_dump(demo_scenario(rounds)))
        out = cluster.run(scenario, cluster.workdir / "out")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        names = cluster.node_names()
        failures = [(r["round"], names.get(node, node), reason)
                    for r in rows for node, reason in r.get("failure_reasons", {}).items()]
        log("\n" + table(rows))
        log("\nfailures:" if failures else "\nfailures: none")
        for rnd, node, reason in failures:
            log(f"  round {rnd}, node {node}: {reason}")
        return {"rows": rows, "failures": failures, "refused": (code, why), "out": str(out)}
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        left = cluster.wait_gone()
        log(f"stopped {len(cluster.procs)} process groups (PIDs {', '.join(str(p.pid) for p in cluster.procs)})"
            + (f"; STILL ALIVE: {left}" if left else "; none left") + f"; {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedsim.deploy.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where certificates, logs and results go (default: a temporary folder)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedsim-deploy-"))
    try:
        result = run_demo(workdir, args.rounds)
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"deploy demo failed: {exc}\n(logs in {workdir / 'logs'})", file=sys.stderr)
        return 1
    ok = (result["refused"][0] != 0 and len(result["rows"]) == args.rounds
          and all(r["failures"] == 1 and r["participants"] == 1 for r in result["rows"]))
    print(f"\nresults and logs in {workdir}" + ("" if ok else "\nUNEXPECTED: see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
