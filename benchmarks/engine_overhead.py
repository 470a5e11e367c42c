"""Engine overhead: what fedsim costs on top of the training it runs, and what Flower's costs.

Workload W1: digits, 10 IID clients, all train every round, 1 local epoch, batch 32,
SGD lr 0.05, MLP 64-256-10, FedAvg weighted by examples, 60 rounds, central evaluation
every round. Four ways, each in its own subprocess (so Ray and torch threads never leak
between them), wall time measured by this process from spawn to exit:

  bare     a plain PyTorch loop over the same client tensors, the same initial model and
           the same per-client seeds (the lower bound; it loads the digits as a bare
           script would, then trains on tensors this process prepared from fedsim's split)
  flower   the same workload written as Flower's PyTorch quick-start teaches: ServerApp
           with flwr.serverapp.strategy.FedAvg, ClientApp with @app.train, DataLoader over
           an IidPartitioner partition (of the in-memory digits, not the hub), run by
           flwr.simulation.run_simulation with client_resources num_cpus 1
  inline   `python -m fedsim W1.yaml --quiet`, engine inline (the command a user runs)
  ray      `python -m fedsim W1.yaml --quiet`, engine ray (one actor per CPU)
  vectorized  `python -m fedsim W1.yaml --quiet`, engine vectorized (the round's clients trained together
           with torch.func: fedsim.engines.vectorized)

and the cost of the checkpoint `fedsim resume` reads (written every round by default,
``output.checkpoint_every: 1``), as a fraction of a W1 round, two ways:

  inline-nockpt  the inline run with ``output.checkpoint_every: 0``: (median time between two
                 rounds' ends with checkpoints - without) / without, the two runs measured here
  ckpt           the inline run in this benchmark's child process, timing every checkpoint write
                 (``fedsim.run.checkpoint.Checkpointer``): the median of each write / its round's
                 ``wall_s`` (the figure the target is for: the on/off pair is two runs, and on a
                 shared machine the load can drift between them by more than the checkpoint costs)

Targets: inline within 1.5x of bare; ray at least 3x faster than flower; a checkpoint at most
0.10 of a W1 round; vectorized per round at most 1/3 of bare's.

Cross-device (``--cross-device``, or ``xdev`` in ``--only``): 1,000 clients of 20 samples each (synthetic
16x16 images, IID, no validation split), 100 a round, 1 local epoch of batch 10, the same MLP
(256 inputs), FedAvg, 11 rounds: inline against vectorized, each `python -m fedsim`, per round
(median time between round ends). Target: vectorized at least 5x faster than inline.

Reading the vectorized figures: the engine batches only the local training (and the stacking of the sent
weights); every client's reply still goes through the ClientApp's own reply path (update defenses, codec,
``to_record`` of its weights) and the server's round (decoding, the finiteness check, Flower's aggregation,
the evaluation, the checkpoint) is the same on every engine. Those fixed costs bound the speed-up: in the
cross-device round, with 2 steps of 10 samples per client, training is a minority of inline's round.

Per round, start-up left out: ``step ms`` is the median time between two rounds' ends (for
fedsim: consecutive ``elapsed_s`` in metrics.jsonl, so the round and what follows its row, the
checkpoint included; for bare and flower: consecutive round-end stamps), and the check line
``inline/bare per round`` is inline's step over bare's (target at most 1.0).

Read the inline/bare ratio knowing two start-up costs the bare loop pays and fedsim does not:
``torch.optim.SGD`` imports ``torch._dynamo`` (~1.5 s; fedsim calls the same update function,
strategies/sgd.py), and interpreter teardown (`python -m fedsim` freezes the GC first).
Usage: python benchmarks/engine_overhead.py [--rounds 60] [--only bare,inline,vectorized] [--cross-device]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEED = 0
ROUNDS = 60
NUM_CLIENTS = 10
BATCH, LR, LOCAL_EPOCHS, HIDDEN = 32, 0.05, 1, 256
VARIANTS = ("bare", "flower", "inline", "inline-nockpt", "ckpt", "ray", "vectorized")
CHECKPOINT_TARGET = 0.10
VECTORIZED_TARGET = 1 / 3  # vectorized/bare per round, at most
XDEV_CLIENTS, XDEV_PER_ROUND, XDEV_SAMPLES, XDEV_BATCH, XDEV_ROUNDS = 1000, 100, 20, 10, 11
XDEV_TARGET = 5.0  # inline/vectorized per round, at least


def w1_raw(engine: str, rounds: int, checkpoint_every: int = 1) -> dict:
    return {
        "name": f"w1-{engine}", "seed": SEED,
        "data": {"dataset": "digits", "num_clients": NUM_CLIENTS, "partition": {"name": "iid"}},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "strategy": {"name": "fedavg"},
        "train": {"rounds": rounds, "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH, "lr": LR,
                  "participation": 1.0},
        "engine": {"name": engine},
        "output": {"plot": False, "progress": False, "checkpoint_every": checkpoint_every},
    }


def xdev_raw(engine: str, rounds: int = XDEV_ROUNDS) -> dict:
    """The cross-device round: many small clients, a tenth of them a round."""
    return {
        "name": f"xdev-{engine}", "seed": SEED,
        "data": {"dataset": "synthetic", "num_clients": XDEV_CLIENTS, "val_fraction": 0.0,
                 "partition": {"name": "iid"},
                 "synthetic": {"classes": 10, "channels": 1, "size": 16, "train": XDEV_CLIENTS * XDEV_SAMPLES,
                               "test": 1000}},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "strategy": {"name": "fedavg"},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": XDEV_BATCH, "lr": LR,
                  "participation": XDEV_PER_ROUND / XDEV_CLIENTS},
        "engine": {"name": engine},
        "output": {"plot": False, "progress": False},
    }


def emit(**result) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent-side preparation


def prepare_bare(path: Path, rounds: int) -> None:
    """W1's client tensors, initial model and per-(round, client) seeds, exactly as fedsim derives them."""
    import torch

    from fedsim.scenario import parse_scenario
    from fedsim.world import build_world
    from strategies.trainer import client_seed

    world = build_world(parse_scenario(w1_raw("inline", rounds)))
    clients = [world.client_tensors(i)[:2] for i in range(NUM_CLIENTS)]
    seeds = [[client_seed(SEED, r, i) for i in range(NUM_CLIENTS)] for r in range(1, rounds + 1)]
    torch.save({"clients": clients, "x_test": world.dataset.x_test, "y_test": world.dataset.y_test,
                "init": world.new_model().state_dict(), "seeds": seeds}, path)


# ----------------------------------------------------------------------------- (a) bare loop


def run_bare(prep: Path, rounds: int) -> None:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    # A bare script loads its data itself; it pays that (the digits from scikit-learn), then
    # trains on exactly fedsim's client tensors and seeds so both do the same work.
    from sklearn.datasets import load_digits

    load_digits()
    d = torch.load(prep)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU()), nn.Linear(HIDDEN, 10))
    # fedsim's MLP names its blocks; copy by position so the initial weights are the same.
    for p, v in zip(model.parameters(), d["init"].values()):
        p.data.copy_(v)
    global_params = [p.detach().clone() for p in model.parameters()]
    total = sum(len(y) for _, y in d["clients"])
    round_s, ends = [], []
    for rnd in range(rounds):
        t0 = time.perf_counter()
        new = [torch.zeros_like(p) for p in global_params]
        for cid, (x, y) in enumerate(d["clients"]):
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_params):
                    p.copy_(g)
            gen = torch.Generator().manual_seed(d["seeds"][rnd][cid])
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            model.train()
            for _ in range(LOCAL_EPOCHS):
                perm = torch.randperm(len(y), generator=gen)
                for s in range(0, len(y), BATCH):
                    idx = perm[s : s + BATCH]
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for acc, p in zip(new, model.parameters()):
                    acc.add_(p, alpha=len(y) / total)
        global_params = new
        with torch.no_grad():
            for p, g in zip(model.parameters(), global_params):
                p.copy_(g)
            model.eval()
            accuracy = float((model(d["x_test"]).argmax(1) == d["y_test"]).float().mean())
        ends.append(time.perf_counter())
        round_s.append(ends[-1] - t0)
    emit(accuracy=accuracy, round_s=round_s, step_s=[b - a for a, b in zip(ends, ends[1:])])


# ----------------------------------------------------------------------------- (b) Flower quick-start style


def run_flower(rounds: int) -> None:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from torch import nn

    from fedsim.engines.ray_cluster import bind_ray_to_loopback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, HIDDEN), nn.Linear(HIDDEN, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    cache: dict = {}  # the quick-start's module-level `fds` cache, one per worker process

    def load_data(partition_id: int, num_partitions: int, batch_size: int):
        from datasets import Dataset
        from flwr_datasets.partitioner import IidPartitioner
        from torch.utils.data import DataLoader

        from fedsim.world.data import load_dataset

        if "partitioner" not in cache:
            ds = load_dataset("digits")  # in memory, instead of the quick-start's hub download
            partitioner = IidPartitioner(num_partitions=num_partitions)
            partitioner.dataset = Dataset.from_dict({"img": ds.x_train.numpy(), "label": ds.y_train.numpy()})
            cache["partitioner"] = partitioner
        partition = cache["partitioner"].load_partition(partition_id)
        train_test = partition.train_test_split(test_size=0.1, seed=42).with_format("torch")
        trainloader = DataLoader(train_test["train"], batch_size=batch_size, shuffle=True)
        testloader = DataLoader(train_test["test"], batch_size=batch_size)
        return trainloader, testloader

    def train_fn(net, trainloader, epochs, lr):
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        net.train()
        running_loss = 0.0
        for _ in range(epochs):
            for batch in trainloader:
                optimizer.zero_grad()
                loss = criterion(net(batch["img"]), batch["label"])
                loss.backward()
                optimizer.step()
                running_loss += loss.item()
        return running_loss / (epochs * len(trainloader))

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context):
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"],
                                   BATCH)
        train_loss = train_fn(model, trainloader, LOCAL_EPOCHS, msg.content["config"]["lr"])
        metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    stamps: list[float] = []
    final: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedsim.world.data import load_dataset

        test = load_dataset("digits")

        def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = Net()
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            with torch.no_grad():
                acc = float((model(test.x_test).argmax(1) == test.y_test).float().mean())
            stamps.append(time.perf_counter())
            final["accuracy"] = acc
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NUM_CLIENTS)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                       train_config=ConfigRecord({"lr": LR}), num_rounds=rounds, evaluate_fn=global_evaluate)

    bind_ray_to_loopback()  # the only departure from the quick-start: this machine allows loopback only
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1}})
    between = [b - a for a, b in zip(stamps, stamps[1:])]  # its rounds' ends (each central evaluation)
    emit(accuracy=final.get("accuracy"), round_s=between, step_s=between)


# ----------------------------------------------------------------------------- (c) the checkpoint's own time


def run_ckpt(rounds: int) -> None:
    """W1 inline, as `python -m fedsim` runs it, with every checkpoint write timed."""
    sys.path.insert(0, str(REPO))
    import torch

    from fedsim.run import checkpoint
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics
    from fedsim.scenario import parse_scenario

    torch.set_num_threads(1)
    spent: list[float] = []
    write = checkpoint.Checkpointer.on_round

    def timed(self, record) -> None:
        t0 = time.perf_counter()
        write(self, record)
        spent.append(time.perf_counter() - t0)

    checkpoint.Checkpointer.on_round = timed
    with tempfile.TemporaryDirectory() as out:
        summary = run_scenario(parse_scenario(w1_raw("inline", rounds)), out, progress=False)
        rows = read_metrics(out)
    emit(accuracy=summary["accuracy"], round_s=[r["wall_s"] for r in rows], ckpt_s=spent,
         step_s=[b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])])


# ----------------------------------------------------------------------------- parent


def spawn(variant: str, rounds: int, prep: Path) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = prep.parent / f"out-{variant}"
    fedsim_run = variant in ("inline", "inline-nockpt", "ray", "vectorized") or variant.startswith("xdev-")
    if fedsim_run:
        scenario = prep.parent / f"w1-{variant}.yaml"
        if variant.startswith("xdev-"):
            raw = xdev_raw(variant[len("xdev-"):])
        else:
            raw = w1_raw(variant.split("-")[0], rounds, checkpoint_every=0 if variant.endswith("nockpt") else 1)
        scenario.write_text(yaml.safe_dump(raw, sort_keys=False))
        cmd = [sys.executable, "-m", "fedsim", str(scenario), "--out", str(out), "--quiet"]
    else:
        cmd = [sys.executable, __file__, "--child", variant, "--rounds", str(rounds), "--prep", str(prep)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    if fedsim_run:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        # between two rounds' ends: the round, and what follows its row (the checkpoint, when on)
        step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
        return {"wall": wall, "accuracy": summary["accuracy"], "round_s": [r["wall_s"] for r in rows],
                "step_s": step_s}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return {"wall": wall, **json.loads(lines[-1][len("RESULT "):])}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--cross-device", action="store_true", help="also the cross-device case (xdev in --only)")
    ap.add_argument("--child", choices=("bare", "flower", "ckpt"), help=argparse.SUPPRESS)
    ap.add_argument("--prep", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "bare":
        return run_bare(args.prep, args.rounds)
    if args.child == "flower":
        return run_flower(args.rounds)
    if args.child == "ckpt":
        return run_ckpt(args.rounds)

    variants = [v for v in args.only.split(",") if v]
    xdev = args.cross_device or "xdev" in variants
    variants = [v for v in variants if v != "xdev"]
    if "bare" not in variants:
        variants.insert(0, "bare")  # every ratio is to the bare loop measured in the same run
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "w1.pt"
        prepare_bare(prep, args.rounds)
        results = {}
        for v in variants:
            results[v] = spawn(v, args.rounds, prep)
            print(f"  {v:13s} {results[v]['wall']:6.1f} s", file=sys.stderr, flush=True)
        xdev_results = {}
        for engine in ("inline", "vectorized") if xdev else ():
            xdev_results[engine] = spawn(f"xdev-{engine}", args.rounds, prep)
            print(f"  xdev-{engine:8s} {xdev_results[engine]['wall']:6.1f} s", file=sys.stderr, flush=True)

    bare = results["bare"]
    bare_round, bare_step = median(bare["round_s"]), median(bare["step_s"])
    print(f"\nW1: digits, {NUM_CLIENTS} IID clients, {args.rounds} rounds, MLP 64-{HIDDEN}-10, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':13s} {'wall s':>7s} {'x bare':>7s} {'round ms':>9s} {'vs bare round':>14s} "
          f"{'step ms':>8s} {'x bare':>7s} {'accuracy':>9s}")
    for v, r in results.items():
        rnd, step = median(r["round_s"]), median(r["step_s"])
        print(f"{v:13s} {r['wall']:7.1f} {r['wall'] / bare['wall']:7.2f} {rnd * 1e3:9.1f} "
              f"{(rnd - bare_round) * 1e3:+13.1f}ms {step * 1e3:8.1f} {step / bare_step:7.2f} {r['accuracy']:9.4f}")
    print("round ms: median wall time of one round (all clients train, central evaluation); "
          "'vs bare round' is the engine's own per-round cost (for ray: after 2-way parallelism); "
          "step ms: median time between two rounds' ends (start-up excluded), and its ratio to bare's.")
    checks = []
    if "inline" in results:
        ratio = results["inline"]["wall"] / bare["wall"]
        checks.append(f"inline/bare = {ratio:.2f} (wall, start-up included; target <= 1.5: "
                      f"{'met' if ratio <= 1.5 else 'MISSED'})")
        per_round = median(results["inline"]["step_s"]) / bare_step
        checks.append(f"inline/bare per round = {per_round:.2f} (median time between round ends, "
                      f"{median(results['inline']['step_s']) * 1e3:.1f} ms against {bare_step * 1e3:.1f} ms; "
                      f"target <= 1.0: {'met' if per_round <= 1.0 else 'MISSED'})")
    if "ray" in results and "flower" in results:
        speedup = results["flower"]["wall"] / results["ray"]["wall"]
        checks.append(f"flower/ray = {speedup:.2f} (target >= 3: {'met' if speedup >= 3 else 'MISSED'})")
    if "inline" in results and "inline-nockpt" in results:
        on, off = median(results["inline"]["step_s"]), median(results["inline-nockpt"]["step_s"])
        ratio = (on - off) / off
        checks.append(f"checkpoint every round, runs on vs off: {(on - off) * 1e3:+.2f} ms on a {off * 1e3:.1f} ms "
                      f"round = {ratio:+.3f} (two runs' medians: on a shared machine, load drift between "
                      "them can outweigh the checkpoint; the timed figure below is the one to read)")
    if "ckpt" in results:
        r = results["ckpt"]
        write, rnd = median(r["ckpt_s"]), median(r["round_s"])
        ratio = median([w / t for w, t in zip(r["ckpt_s"], r["round_s"])])  # each write against its own round
        checks.append(f"checkpoint every round, timed: {write * 1e3:.2f} ms a write, {rnd * 1e3:.1f} ms a round; "
                      f"median write/round = {ratio:.3f} (target <= {CHECKPOINT_TARGET}: "
                      f"{'met' if ratio <= CHECKPOINT_TARGET else 'MISSED'})")
    if "vectorized" in results:
        vec_step = median(results["vectorized"]["step_s"])
        ratio = vec_step / bare_step
        checks.append(f"vectorized/bare per round = {ratio:.2f} ({vec_step * 1e3:.1f} ms against "
                      f"{bare_step * 1e3:.1f} ms = {1 / ratio:.2f}x faster; target <= {VECTORIZED_TARGET:.2f}: "
                      f"{'met' if ratio <= VECTORIZED_TARGET else 'MISSED'})")
    if xdev_results:
        inl, vec = (median(xdev_results[e]["step_s"]) for e in ("inline", "vectorized"))
        speedup = inl / vec
        checks.append(f"cross-device ({XDEV_CLIENTS} clients x {XDEV_SAMPLES} samples, {XDEV_PER_ROUND} a round, batch "
                      f"{XDEV_BATCH}, MLP): inline {inl * 1e3:.1f} ms, vectorized {vec * 1e3:.1f} ms a round = "
                      f"{speedup:.2f}x (target >= {XDEV_TARGET:.0f}: {'met' if speedup >= XDEV_TARGET else 'MISSED'}); "
                      f"accuracy inline {xdev_results['inline']['accuracy']:.4f}, vectorized "
                      f"{xdev_results['vectorized']['accuracy']:.4f}; wall {xdev_results['inline']['wall']:.1f} s "
                      f"against {xdev_results['vectorized']['wall']:.1f} s")
    for c in checks:
        print(c)


if __name__ == "__main__":
    main()
