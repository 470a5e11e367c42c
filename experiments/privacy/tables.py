"""Tables of the empirical-privacy sweep (experiments/privacy/RESULTS.md), from its run folders.

    .venv/bin/python -m fedsim sweep experiments/privacy/sweep.yaml --workers 1 --out runs/privacy
    .venv/bin/python experiments/privacy/tables.py runs/privacy

Per defense, mean ± std over the seeds: the accountant's epsilon after the last round, the canaries'
empirical epsilon for the final model and for all iterates (each from its own arm of the sweep; the two
arms train the same model, seed for seed), the epsilon of one Gaussian release at the same noise
multiplier (what a canary inserted once can show at most), the worst and the mean membership AUC over the
audited clients, the worst TPR at 0.1% FPR,
the worst audit PSNR and the final accuracy; then the estimate against the accountant per round. Copies
the sweep's runs.csv here.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


from experiments.uploads.tables import ms, rows, run_files  # noqa: E402  (the installed package)

DELTA = 1e-5


def noise(defense: str) -> float | None:
    d = json.loads(defense) if defense.startswith("{") else {}
    return d.get("noise_multiplier")


def label(defense: str) -> str:
    z = noise(defense)
    return "no defense" if z is None else f"dp_user z={z:g}"


def one_release(z: float | None) -> float | None:
    """Epsilon at DELTA of one Gaussian mechanism of noise multiplier ``z`` (dp-accounting's PLD)."""
    if z is None:
        return None
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z))
    return acc.get_epsilon(DELTA)


def point_key(row: dict) -> str:
    """The paper's point estimate: ``epsilon_est_point`` since ``epsilon_est`` became its 95% lower bound
    (fedsim.privacy.canaries.epsilon_lower_bound); ``epsilon_est`` in runs from before."""
    return "epsilon_est_point" if "epsilon_est_point" in row else "epsilon_est"


def est(summary: dict) -> float:
    """The run's last point estimate; an unbounded one (None in summary.json) as inf."""
    key = point_key(summary)
    return math.inf if summary.get(key) is None else summary[key]


def ms_inf(values, fmt="{:.2f}") -> str:
    """ms, with unbounded estimates counted and left out of the mean."""
    inf = sum(1 for v in values if v == math.inf)
    text = ms([v for v in values if v != math.inf], fmt)
    return text if not inf else ("∞" if text == "-" else f"{text} (+{inf} ∞)")


def tables(root: Path) -> str:
    by = defaultdict(lambda: defaultdict(dict))  # defense -> threat -> seed -> files
    for r in rows(root):
        by[r["defense"]][r["privacy.threat"]][r["seed"]] = run_files(root, r["run"])
    main = ["| defense | accountant ε | empirical ε, final model | empirical ε, all iterates | ε of one release | "
            "membership AUC, worst | membership AUC, mean | TPR @ 0.1% FPR | audit PSNR (dB) | accuracy |",
            "|---|" + "---|" * 9]
    per_round = []
    for defense, threats in by.items():
        final, every = threats.get("final", {}), threats.get("all_iterates", {})
        ref = final or every
        z = noise(defense)
        one = one_release(z)
        eps = ms([s.get("epsilon") for s, _, _ in ref.values()], "{:.2f}")
        auc = ms([max((a["membership_auc"] for a in audit if a.get("membership_auc") is not None), default=None)
                  for _, _, audit in ref.values()], "{:.3f}")
        auc_mean = ms([statistics.mean(a["membership_auc"] for a in audit if a.get("membership_auc") is not None)
                       for _, _, audit in ref.values()], "{:.3f}")
        tpr = ms([max((a["membership_tpr_at_0.1%_fpr"] for a in audit
                       if a.get("membership_tpr_at_0.1%_fpr") is not None), default=None)
                  for _, _, audit in ref.values()], "{:.3f}")
        psnr = ms([max((a["psnr"] for a in audit if a.get("psnr") is not None), default=None)
                   for _, _, audit in ref.values()])
        acc = ms([s["accuracy"] for s, _, _ in ref.values()], "{:.3f}")
        same = all(final[k][0]["accuracy"] == every[k][0]["accuracy"] for k in final if k in every)
        main.append(f"| {label(defense)} | {eps} | {ms_inf([est(s) for s, _, _ in final.values()])} | "
                    f"{ms_inf([est(s) for s, _, _ in every.values()])} | {'-' if one is None else f'{one:.2f}'} | "
                    f"{auc} | {auc_mean} | {tpr} | {psnr} | {acc}{'' if same else ' (arms differ)'} |")
        rounds = sorted({m["round"] for _, metrics, _ in ref.values() for m in metrics if "epsilon_est" in m})
        line = [f"| {label(defense)} | accountant | " + " | ".join(
            ms([next((m.get("epsilon") for m in metrics if m["round"] == t), None) for _, metrics, _ in ref.values()],
               "{:.2f}") for t in rounds) + " |"]
        bounds = any("epsilon_est_point" in m for _, metrics, _ in ref.values() for m in metrics)
        for threat, seeds in (("final", final), ("all iterates", every)):
            for name, key in (("empirical", None), *((("95% lower bound", "epsilon_est"),) if bounds else ())):
                line.append(f"| | {name}, {threat} | " + " | ".join(ms_inf(
                    [next((math.inf if m[key or point_key(m)] is None else m[key or point_key(m)] for m in metrics
                           if m["round"] == t and "epsilon_est" in m), None) for _, metrics, _ in seeds.values()])
                    for t in rounds) + " |")
        per_round.append((rounds, line))
    rounds = per_round[0][0] if per_round else []
    head = ["| defense | epsilon | " + " | ".join(f"round {t}" for t in rounds) + " |",
            "|---|---|" + "---|" * len(rounds)]
    return ("### Per noise level (mean ± std over seeds)\n\n" + "\n".join(main)
            + "\n\n### Per round: the accountant and the estimates (mean ± std over seeds)\n\n"
            + "\n".join(head + [line for _, lines in per_round for line in lines]))


def main(out: str) -> None:
    root = Path(out) / "privacy"
    print(tables(root))
    shutil.copyfile(root / "runs.csv", HERE / "runs.csv")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/privacy")
