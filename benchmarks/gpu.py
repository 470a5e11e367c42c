"""GPU against CPU: the same three workloads on ``engine.device: cpu`` and on the GPU torch sees.

1. quick-start: ``experiments/scenarios/quickstart.yaml`` as shipped (MLP on digits, 10 clients, inline
   engine, ``engine.torch_threads`` 1), ``--rounds`` rounds, no plots.
2. resnet18 round: one FedAvg round of the CIFAR-style ResNet-18 (``fedsim.world.models``) on synthetic
   32x32 colour data, 10 classes (``data.dataset: synthetic``), ``--resnet-train`` training images over 10
   clients, one local epoch, batch 32; the CPU column with every core (``engine.torch_threads``).
3. IG, batch 8: Inverting Gradients (``attacks.inverting_gradients``) on ResNet-18, a batch of 8 of the
   ``patches`` data set (32x32 colour), gradient threat, ``--ig-iterations`` iterations, one restart; the
   CPU column with every core.

Each row is one timed run after a warm-up of the device (CUDA's context, the attack's optimiser import);
the GPU's runs end with the results on the CPU, so its asynchronous kernels are all counted. GPU results
differ from the CPU's by float kernels (docs/engines.md), so the final accuracy of each engine is printed
beside its time.

    python benchmarks/gpu.py            # the full sizes; without a GPU it says so and exits 0
    python benchmarks/gpu.py --quick    # small sizes (2 rounds, 200 images, 5 IG iterations): a smoke run,
                                        # the CPU column alone when there is no GPU

Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedsim.scenario import load_scenario, parse_scenario  # noqa: E402
from fedsim.world.device import resolve_device, visible_devices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gpu_name() -> str | None:
    """The accelerator ``auto`` picks, or None when torch sees only the CPU."""
    device = resolve_device("auto")
    return None if device.type == "cpu" else str(device)


def warm_up(device: str) -> None:
    """CUDA's context and the attack's first optimiser (a compiler import) before any timing."""
    from attacks.base import _warm_up

    _warm_up()
    if device != "cpu":
        (torch.ones(8, device=device) * 2).sum().item()


def run_quickstart(device: str, rounds: int) -> tuple[float, str]:
    from fedsim.engines import run_scenario

    s = load_scenario(ROOT / "experiments/scenarios/quickstart.yaml",
                      [f"engine.device={device}", f"train.rounds={rounds}", "output.plot=false",
                       "output.progress=false", "output.checkpoint_every=0"])
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_scenario(s, out, progress=False)
        return time.perf_counter() - start, f"accuracy {summary['accuracy']:.4f}"


def run_resnet_round(device: str, train: int) -> tuple[float, str]:
    from fedsim.engines import run_scenario

    raw = {"name": "gpu-resnet18", "seed": 0,
           "data": {"dataset": "synthetic", "num_clients": 10, "val_fraction": 0.0,
                    "synthetic": {"channels": 3, "size": 32, "classes": 10, "train": train, "test": max(10, train // 5)}},
           "model": {"name": "resnet18"}, "strategy": {"name": "fedavg"},
           "train": {"rounds": 1, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
           "engine": {"name": "inline", "device": device, "torch_threads": os.cpu_count() or 1},
           "output": {"plot": False, "progress": False, "checkpoint_every": 0}}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_scenario(parse_scenario(raw), out, progress=False)
        return time.perf_counter() - start, f"accuracy {summary['accuracy']:.4f}"


def run_ig(device: str, iterations: int) -> tuple[float, str]:
    from attacks import build_attack
    from attacks.case import build_case
    from attacks.metrics import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    case = build_case(model="resnet18", dataset="patches", batch_size=8, seed=0, threat="gradient")
    observation = case.observation.to(resolve_device(device))
    attack = build_attack("ig", iterations=iterations, restarts=1, seed=0, stop_patience=0)
    start = time.perf_counter()
    rec = attack.reconstruct(observation)  # the images come back on the CPU: every kernel has run
    wall = time.perf_counter() - start
    return wall, f"psnr {evaluate(rec.images, case.images, rec.hard_labels(), case.labels)['psnr']:.2f} dB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes; the CPU column alone when there is no GPU")
    p.add_argument("--rounds", type=int, help="quick-start rounds (default 40, quick 2)")
    p.add_argument("--resnet-train", type=int, help="ResNet-18 round's training images (default 5000, quick 200)")
    p.add_argument("--ig-iterations", type=int, help="IG iterations (default 200, quick 5)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 40)
    train = args.resnet_train or (200 if args.quick else 5000)
    iterations = args.ig_iterations or (5 if args.quick else 200)

    gpu = gpu_name()
    if gpu is None:
        print(f"no GPU: torch sees {', '.join(visible_devices())}")
        if not args.quick:
            print("nothing timed; run with --quick for the CPU column alone, or on a machine with a GPU")
            return 0
    devices = ["cpu"] + ([gpu] if gpu else [])
    label = torch.cuda.get_device_name() if gpu and gpu.startswith("cuda") else (gpu or "-")
    workloads = [(f"quick-start, {rounds} rounds", lambda d: run_quickstart(d, rounds)),
                 (f"resnet18 round, {train} images 32x32x3", lambda d: run_resnet_round(d, train)),
                 (f"IG resnet18, batch 8, {iterations} its", lambda d: run_ig(d, iterations))]
    for device in devices:
        warm_up(device)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, GPU: {label}")
    print(f"{'workload':<40} {'CPU s':>9} {'GPU s':>9} {'speed-up':>9}   results (CPU | GPU)")
    for name, work in workloads:
        times, results = [], []
        for device in devices:
            wall, result = work(device)
            times.append(wall)
            results.append(result)
        gpu_s = f"{times[1]:9.2f}" if gpu else f"{'-':>9}"
        speed = f"{times[0] / times[1]:8.1f}x" if gpu else f"{'-':>9}"
        print(f"{name:<40} {times[0]:9.2f} {gpu_s} {speed}   {' | '.join(results)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
