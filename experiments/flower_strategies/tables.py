"""Tables of the Flower-strategies sweep (experiments/flower_strategies/RESULTS.md), from its run folders.

    python -m fedsim sweep experiments/flower_strategies/noniid.yaml --workers 2 --out runs/flower_strategies
    python experiments/flower_strategies/tables.py runs/flower_strategies

Per strategy, mean ± std over the seeds: test accuracy at a few rounds, the final and best accuracy, and
the audit's PSNR at each audited round (each seed's mean over its audited clients first). Copies the
sweep's runs.csv here.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent

from experiments.uploads.tables import ms, rows, run_files  # noqa: E402  (the installed package)

ROUNDS = (5, 10, 20, 30, 40)


def label(strategy: str) -> str:
    s = json.loads(strategy) if strategy.startswith("{") else {"name": strategy}
    name = s.pop("name")
    return name + (" (" + ", ".join(f"{k} {v}" for k, v in s.items()) + ")" if s else "")


def tables(root: Path) -> str:
    by = defaultdict(dict)
    for r in rows(root):
        by[r["strategy"]][r["seed"]] = run_files(root, r["run"])
    audited = sorted({a["round"] for seeds in by.values() for _, _, audit in seeds.values() for a in audit})
    acc = ["| strategy | " + " | ".join(f"round {n}" for n in ROUNDS) + " | best | wall s |",
           "|---|" + "---|" * (len(ROUNDS) + 2)]
    psnr = ["| strategy | " + " | ".join(f"round {n}" for n in audited) + " | all rounds | label acc |",
            "|---|" + "---|" * (len(audited) + 2)]
    for strategy, seeds in by.items():
        at = [ms([m[n - 1]["accuracy"] for _, m, _ in seeds.values()], "{:.3f}") for n in ROUNDS]
        best = ms([s["best_accuracy"] for s, _, _ in seeds.values()], "{:.3f}")
        wall = ms([s["wall_s"] for s, _, _ in seeds.values()], "{:.0f}")
        acc.append(f"| {label(strategy)} | " + " | ".join(at) + f" | {best} | {wall} |")

        def per_seed(key, rounds):
            return [statistics.mean(a[key] for a in audit if a["round"] in rounds)
                    for _, _, audit in seeds.values() if any(a["round"] in rounds for a in audit)]

        cells = [ms(per_seed("psnr", {n})) for n in audited]
        psnr.append(f"| {label(strategy)} | " + " | ".join(cells) + f" | {ms(per_seed('psnr', set(audited)))} | "
                    f"{ms(per_seed('label_accuracy', set(audited)), '{:.2f}')} |")
    return "### Test accuracy\n\n" + "\n".join(acc) + "\n\n### Audit PSNR (dB)\n\n" + "\n".join(psnr)


def main(out: str) -> None:
    root = Path(out) / "flower_strategies"
    print(tables(root))
    shutil.copyfile(root / "runs.csv", HERE / "runs.csv")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/flower_strategies")
