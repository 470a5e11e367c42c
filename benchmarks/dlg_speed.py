"""DLG speed and reliability: fedsim's DLG against a plain loop of the paper's code.

Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019 (``dlg/main.py``): the plain
loop is that reference, re-implemented here: dummy image and label from randn,
``torch.optim.LBFGS(lr=1)`` (max_iter 20, no line search), a closure that rebuilds the
graph and back-propagates into the model's parameters too, no restarts, 300 steps.
Both run on the sigmoid LeNet (uniform(-0.5, 0.5) weights), batch 1, the ``patches``
data set, over the same seeds (victim case and attack seeded alike), single-threaded,
in one process.

Reported per method: L-BFGS steps per second, model forward passes (closure calls) per
second, success rate (PSNR >= 30 dB within the run), median and range of the time to
first reach 30 dB (PSNR measured after every step, outside the timed region). A run
stops when it reaches 30 dB, diverges (NaN, or the whole budget is spent).
Not a test: ``python benchmarks/dlg_speed.py [--seeds 10] [--steps 300] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import build_attack  # noqa: E402
from attacks.case import build_case  # noqa: E402
from attacks.metrics import psnr  # noqa: E402

TARGET_DB = 30.0


class _Counter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, mod, inp):
        self.calls += 1


def plain_dlg(case, seed: int, steps: int, budget_s: float) -> dict:
    """The paper's loop, as close to ``dlg/main.py`` as the case allows."""
    net = case.observation.model
    for p in net.parameters():
        p.requires_grad_(True)
    target = [g.clone() for g in case.observation.gradients]
    torch.manual_seed(seed)
    dummy_data = torch.randn(case.images.shape).requires_grad_(True)
    dummy_label = torch.randn(1, case.observation.num_classes).requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy_data, dummy_label], lr=1)
    counter = _Counter(net)

    def closure():
        optimizer.zero_grad()
        pred = net(dummy_data)
        onehot = F.softmax(dummy_label, dim=-1)
        loss = torch.mean(torch.sum(-onehot * F.log_softmax(pred, dim=-1), 1))
        dy_dx = torch.autograd.grad(loss, net.parameters(), create_graph=True)
        grad_diff = sum(((gx - gy) ** 2).sum() for gx, gy in zip(dy_dx, target))
        grad_diff.backward()
        return grad_diff

    timed, hit, status, done = 0.0, None, "steps", 0
    for step in range(steps):
        t0 = time.perf_counter()
        loss = optimizer.step(closure)
        timed += time.perf_counter() - t0
        done += 1
        if not math.isfinite(float(loss)) or not torch.isfinite(dummy_data).all():
            status = "diverged"
            break
        if psnr(dummy_data.detach().clamp(0, 1), case.images)[0] >= TARGET_DB:
            hit, status = timed, "reached"
            break
        if timed > budget_s:
            status = "time"
            break
    counter.handle.remove()
    for p in net.parameters():
        p.requires_grad_(False)
    return {"seed": seed, "status": status, "time_to_target_s": hit, "steps": done,
            "forwards": counter.calls, "timed_s": timed}


def fedsim_dlg(case, seed: int, steps: int, budget_s: float) -> dict:
    state = {"hit": None, "paused": 0.0, "steps": 0}
    counter = _Counter(case.observation.model)
    start = [0.0]

    class Reached(Exception):
        pass

    def callback(it, images):
        t0 = time.perf_counter()
        state["steps"] = it
        if psnr(images.clamp(0, 1), case.images)[0] >= TARGET_DB:
            state["hit"] = t0 - start[0] - state["paused"]
            raise Reached
        state["paused"] += time.perf_counter() - t0

    attack = build_attack("dlg", steps=steps, seed=seed, callback=callback, time_budget_s=budget_s)
    start[0] = time.perf_counter()
    status = "steps"
    try:
        rec = attack.reconstruct(case.observation)
        status = rec.extras["status"]
        state["steps"] = rec.iterations
    except Reached:
        status = "reached"
    finally:
        # attacks leave flush-denormal as they found it only on normal return; restore here too
        torch.set_flush_denormal(False)
    timed = (state["hit"] if state["hit"] is not None
             else time.perf_counter() - start[0] - state["paused"])
    counter.handle.remove()
    return {"seed": seed, "status": status, "time_to_target_s": state["hit"], "steps": state["steps"],
            "forwards": counter.calls, "timed_s": timed}


def summarise(name: str, runs: list[dict]) -> dict:
    hits = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
    steps = sum(r["steps"] for r in runs)
    fw = sum(r["forwards"] for r in runs)
    t = sum(r["timed_s"] for r in runs)
    return {"method": name, "success": f"{len(hits)}/{len(runs)}",
            "success_rate": len(hits) / len(runs),
            "median_s_to_30db": statistics.median(hits) if hits else None,
            "min_s": min(hits) if hits else None, "max_s": max(hits) if hits else None,
            "steps_per_s": steps / t if t else None, "forwards_per_s": fw / t if t else None,
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=120.0, help="per run, per method")
    ap.add_argument("--dataset", default="patches")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {"plain": [], "fedsim": []}
    for seed in range(args.seeds):
        case = build_case(model="lenet", dataset=args.dataset, batch_size=1, seed=seed)
        for name, fn in (("plain", plain_dlg), ("fedsim", fedsim_dlg)):
            r = fn(case, seed, args.steps, args.budget_s)
            results[name].append(r)
            t = r["time_to_target_s"]
            print(f"seed {seed} {name:6s} {r['status']:9s} steps {r['steps']:4d} "
                  f"to 30 dB: {'-' if t is None else f'{t:.1f} s'}", flush=True)
    rows = [summarise(n, results[n]) for n in ("plain", "fedsim")]
    print(f"\nDLG, LeNet (sigmoid, uniform init), batch 1, {args.dataset}, {args.seeds} seeds, "
          f"{args.steps} L-BFGS steps max, 1 thread")
    print(f"{'method':8s} {'success':>8s} {'median s to 30 dB':>18s} {'range s':>14s} "
          f"{'steps/s':>8s} {'forwards/s':>10s}")
    for r in rows:
        med = "-" if r["median_s_to_30db"] is None else f"{r['median_s_to_30db']:.2f}"
        rng = "-" if r["min_s"] is None else f"{r['min_s']:.1f}-{r['max_s']:.1f}"
        print(f"{r['method']:8s} {r['success']:>8s} {med:>18s} {rng:>14s} "
              f"{r['steps_per_s']:8.2f} {r['forwards_per_s']:10.1f}")
    if rows[0]["median_s_to_30db"] and rows[1]["median_s_to_30db"]:
        print(f"speed-up of median time to 30 dB: {rows[0]['median_s_to_30db'] / rows[1]['median_s_to_30db']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
