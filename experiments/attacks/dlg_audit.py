"""The FL audit's iDLG on both LeNet inits, old default against new (issue 22, item 4).

    python experiments/attacks/dlg_audit.py [--rounds 3]

A small FedAvg scenario (digits 8x8, 40 clients, batch 4, 3 rounds, sigmoid LeNet with DLG's uniform(-0.5, 0.5)
init or PyTorch's default), audited every round on clients 3 and 17 with the gradient threat at batch 1 and
``attack: idlg``, once with the attack's defaults and once with the old ones (``objective: l2, tolerances: torch``).
Prints one line per (init, settings): round, client, PSNR, SSIM, L-BFGS steps, stopped, wall s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SETTINGS = {"new default": {}, "old default (objective l2, tolerances torch)": {"objective": "l2", "tolerances": "torch"}}


def scenario(init: str, rounds: int, attack_config: dict) -> dict:
    return {
        "name": f"dlg-audit-{init}", "seed": 0,
        "data": {"dataset": "digits", "num_clients": 40, "partition": {"name": "iid"}},
        "model": {"name": "lenet", "init": init},
        "strategy": {"name": "fedavg"},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 4, "lr": 0.1},
        "output": {"plot": False, "progress": False},
        "audit": {"threat": "gradient", "batch_size": 1, "clients": [3, 17], "attack": "idlg",
                  "attack_config": attack_config},
    }


def main() -> None:
    import torch

    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for init in ("uniform", "default"):
        for name, cfg in SETTINGS.items():
            with tempfile.TemporaryDirectory() as d:
                run_scenario(parse_scenario(scenario(init, args.rounds, cfg)), Path(d), progress=False)
                rows = [json.loads(line) for line in (Path(d) / "audit.jsonl").read_text().splitlines()]
            psnr = [r["psnr"] for r in rows]
            print(f"{init} | {name} | PSNR {min(psnr):.1f}-{max(psnr):.1f} | "
                  + " ".join(f"(r{r['round']} c{r['client']}: {r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}, "
                             f"{r['iterations']} steps, {r['stopped']}, {r['wall_s']:.2f} s)" for r in rows), flush=True)


if __name__ == "__main__":  # the audit's workers are spawned: they re-import this file
    main()
