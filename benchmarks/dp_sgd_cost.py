"""DP-SGD cost: a fedsim DP-SGD round against a non-private round and against a plain Opacus loop.

Workloads (10 IID digits clients, all train every round, 1 local epoch, batch 32, SGD lr 0.05):
  W1     MLP 64-256-10 on 8x8 digits (engine_overhead.py's W1)
  LeNet  DLG's sigmoid LeNet on digits upsampled to 16x16

Per workload, per-round wall time (median over rounds 2..R; round 1 pays one-off imports), in
this process with one torch thread; every variant runs ``--repeat`` times, interleaved, and the
fastest repeat counts (the machine is shared: the minimum is the least disturbed):
  plain    fedsim, no defense
  dp       fedsim with ``defense: {name: dp_sgd, noise_multiplier: 1.0, max_grad_norm: 1.0}``
           (Poisson sampling, RDP accountant), per ``grad_sample_mode``
  opacus   the same training written as Opacus teaches it: per client and round,
           ``PrivacyEngine.make_private`` (Poisson ``DPDataLoader``) on the client's tensors, one
           epoch, then the server's example-weighted average and the same central evaluation

Also, per mode, whether Opacus's per-sample gradients are exact: the largest difference from
per-sample gradients taken one sample at a time (plain autograd) on one batch.

Targets (issue 10): dp / opacus <= 1.2 (fedsim adds nothing) and dp / plain <= 3.
Usage: python benchmarks/dp_sgd_cost.py [--rounds 6] [--repeat 3] [--modes hooks,functorch,ew,ghost] [--workloads W1,LeNet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

NOISE, CLIP, LR, BATCH, CLIENTS = 1.0, 1.0, 0.05, 32, 10


def workload(name: str, rounds: int, defense=None) -> dict:
    raw = {"name": f"dp-bench-{name}", "seed": 0,
           "data": {"dataset": "digits", "num_clients": CLIENTS, "partition": {"name": "iid"}},
           "model": {"name": "mlp", "hidden": [256]},
           "train": {"rounds": rounds, "local_epochs": 1, "batch_size": BATCH, "lr": LR},
           "output": {"plot": False, "progress": False}}
    if name == "LeNet":
        raw["data"]["image_size"] = 16
        raw["model"] = {"name": "lenet", "init": "uniform"}
    if defense:
        raw["defense"] = defense
    return raw


def fedsim_round_ms(raw: dict) -> tuple[float, float]:
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics
    from fedsim.scenario import parse_scenario

    with tempfile.TemporaryDirectory() as out:
        summary = run_scenario(parse_scenario(raw), out, progress=False)
        rows = read_metrics(out)
    return 1000 * statistics.median(r["wall_s"] for r in rows[1:]), summary["accuracy"]


def opacus_round_ms(raw: dict, rounds: int, mode: str) -> tuple[float, float]:
    """The same FL training as a plain Opacus loop (fedsim's data split and initial model, nothing else)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedsim.run.observers import evaluate
    from fedsim.scenario import parse_scenario
    from fedsim.world import build_world

    world = build_world(parse_scenario(raw))
    model = world.new_model()
    clients = [world.client_tensors(i)[:2] for i in range(CLIENTS)]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    engines = [PrivacyEngine(accountant="rdp") for _ in clients]
    times, acc = [], 0.0
    for rnd in range(rounds):
        start = time.perf_counter()
        states, weights = [], []
        for c, (x, y) in enumerate(clients):
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            loader = DataLoader(TensorDataset(x, y), batch_size=BATCH,
                                generator=torch.Generator().manual_seed(rnd * 100 + c))
            criterion = torch.nn.CrossEntropyLoss()
            private = engines[c].make_private(module=model, optimizer=opt, data_loader=loader,
                                              noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=True,
                                              grad_sample_mode=mode, **({"criterion": criterion} if mode == "ghost" else {}))
            if mode == "ghost":  # make_private also returns the two-pass loss
                pm, popt, criterion, pl = private
            else:
                pm, popt, pl = private
            pm.train()
            for xb, yb in pl:
                popt.zero_grad(set_to_none=True)
                criterion(pm(xb), yb).backward()
                popt.step()
            pm._close()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(y))
            # No get_epsilon here: fedsim's clients compute theirs every round, so fedsim does more.
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state}
        model.load_state_dict(global_state)
        acc = evaluate(model, world.dataset.x_test, world.dataset.y_test)[1]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:]), acc


def per_sample_error(raw: dict, mode: str) -> float:
    """max |Opacus per-sample gradient - one-sample autograd gradient| on one batch of 16; for ghost
    clipping, which never forms per-sample gradients, the same for their norms (what it clips by)."""
    from opacus.grad_sample.utils import wrap_model

    from fedsim.scenario import parse_scenario
    from fedsim.world import build_world

    world = build_world(parse_scenario(raw))
    model = world.new_model()
    x, y = world.client_tensors(0)[:2]
    x, y = x[:16], y[:16]
    params = list(model.parameters())
    exact = [torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
             for i in range(len(y))]
    if mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum")
        torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        norms = torch.stack([torch.cat([g.ravel() for g in grads]).norm() for grads in exact])
        err = float((gsm.get_norm_sample() - norms).abs().max())
        gsm._close()
        return err
    gsm = wrap_model(model, mode, batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    err = max(float((p.grad_sample[i] - exact[i][j]).abs().max()) for j, p in enumerate(params) for i in range(len(y)))
    gsm._close()
    return err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--modes", default="hooks,functorch,ew,ghost")
    ap.add_argument("--workloads", default="W1,LeNet")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    modes = args.modes.split(",")
    for name in args.workloads.split(","):
        errors = {mode: per_sample_error(workload(name, 1), mode) for mode in modes}
        best: dict[str, tuple[float, float]] = {}

        def keep(key: str, result: tuple[float, float]) -> None:
            if key not in best or result[0] < best[key][0]:
                best[key] = result

        for _ in range(args.repeat):
            keep("plain", fedsim_round_ms(workload(name, args.rounds)))
            for mode in modes:
                dp = {"name": "dp_sgd", "noise_multiplier": NOISE, "max_grad_norm": CLIP, "grad_sample_mode": mode}
                keep(f"dp-{mode}", fedsim_round_ms(workload(name, args.rounds, dp)))
                keep(f"opacus-{mode}", opacus_round_ms(workload(name, args.rounds), args.rounds, mode))
        plain_ms, plain_acc = best["plain"]
        print(f"\n{name}: {CLIENTS} IID digits clients, 1 epoch of batch {BATCH}, median round of {args.rounds}, "
              f"best of {args.repeat}")
        print(f"  {'mode':<10} {'exact err':>10} {'plain ms':>9} {'dp ms':>8} {'opacus ms':>10} "
              f"{'dp/opacus':>10} {'dp/plain':>9} {'opacus/plain':>13}  accuracy plain/dp/opacus")
        for mode in modes:
            (dp_ms, dp_acc), (op_ms, op_acc) = best[f"dp-{mode}"], best[f"opacus-{mode}"]
            print(f"  {mode:<10} {errors[mode]:>10.1e} {plain_ms:>9.1f} {dp_ms:>8.1f} {op_ms:>10.1f} "
                  f"{dp_ms / op_ms:>10.2f} {dp_ms / plain_ms:>9.2f} {op_ms / plain_ms:>13.2f}  "
                  f"{plain_acc:.3f}/{dp_acc:.3f}/{op_acc:.3f}", flush=True)

if __name__ == "__main__":
    main()
