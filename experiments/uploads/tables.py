"""Tables of the upload-codec sweeps (experiments/uploads/RESULTS.md), from the sweeps' own run folders.

    python experiments/uploads/tables.py runs/uploads        # the --out folder of both sweeps

Reads ``<out>/accuracy`` and ``<out>/audit`` (``runs.csv`` for the settings of each run, each run's
summary.json, metrics.jsonl and audit.jsonl), prints markdown tables (mean ± std over seeds; for the
audit, each seed's mean over its audited clients first) and copies the small runs.csv files here.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def ms(values, fmt="{:.1f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def label(upload: str, support: str | None = None, sketch: str = "") -> str:
    if upload == "none":
        text = "none (dense)"
    else:
        u = json.loads(upload) if upload.startswith("{") else upload
        text = u.pop("codec") + " " + ", ".join(f"{k} {v}" for k, v in u.items()) if isinstance(u, dict) else u
    if support == "False":
        text += " [no support: zeros matched]"
    if sketch and text.startswith("sketch"):
        text += f" [{sketch}]"
    return text.strip()


def rows(root: Path) -> list[dict]:
    with open(root / "runs.csv") as f:
        return list(csv.DictReader(f))


def run_files(root: Path, run: str):
    d = root / "runs" / run
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    audit = []
    if (d / "audit.jsonl").is_file():
        audit = [json.loads(line) for line in (d / "audit.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((d / "summary.json").read_text()), metrics, audit


def accuracy_table(root: Path) -> str:
    by = defaultdict(dict)
    for r in rows(root):
        summary, metrics, _ = run_files(root, r["run"])
        by[r["upload"]][r["seed"]] = (summary, metrics)
    dense = by["none"]
    out = ["| codec | upload MB (all rounds) | less than dense | final accuracy | best accuracy | "
           "final acc. - dense (points, paired) | wall s |", "|---|---|---|---|---|---|---|"]
    for upload, seeds in by.items():
        mb = [s["bytes_up_total"] / 1e6 for s, _ in seeds.values()]
        factor = [dense[k][0]["bytes_up_total"] / s["bytes_up_total"] for k, (s, _) in seeds.items()]
        acc = [s["accuracy"] for s, _ in seeds.values()]
        best = [s["best_accuracy"] for s, _ in seeds.values()]
        diff = [100 * (s["accuracy"] - dense[k][0]["accuracy"]) for k, (s, _) in seeds.items()]
        wall = [s["wall_s"] for s, _ in seeds.values()]
        out.append(f"| {label(upload)} | {ms(mb, '{:.2f}')} | {statistics.mean(factor):.0f}x | {ms(acc, '{:.3f}')} | "
                   f"{ms(best, '{:.3f}')} | {ms(diff, '{:+.1f}')} | {ms(wall, '{:.0f}')} |")
    return "\n".join(out)


def audit_table(root: Path, dense_root: Path | None = None, sketch: str = "") -> str:
    by = defaultdict(dict)
    for r in rows(root):
        summary, metrics, audit = run_files(root, r["run"])
        by[(r["upload"], r.get("audit.support", "True"))][r["seed"]] = (summary, metrics, audit)
    dense_by = defaultdict(dict)
    for r in rows(dense_root or root):
        if r["upload"] == "none":
            dense_by[r["seed"]] = run_files(dense_root or root, r["run"])[0]["bytes_up_total"]
    out = ["| codec (what the attack matched) | upload bytes / dense | PSNR dB | SSIM | label acc | I2F predicted PSNR dB | "
           "coordinates matched | epsilon (1 round, delta 1e-5) | attack s | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    dense = dense_by

    def per_seed(seeds, key):
        vals = []
        for _, _, audit in seeds.values():
            xs = [a[key] for a in audit if a.get(key) is not None]
            vals.append(statistics.mean(xs) if xs else None)
        return vals

    for (upload, support), seeds in by.items():
        eps = [m[-1].get("codec_epsilon") for _, m, _ in seeds.values()]
        ratio = [s["bytes_up_total"] / dense[k] for k, (s, _, _) in seeds.items()]
        notes = {re.sub(r"[0-9.]+% of", "N% of", a["note"].split("; ")[-1])
                 for _, _, audit in seeds.values() for a in audit}
        frac = per_seed(seeds, "support")
        n = sum(len(a) for _, _, a in seeds.values())
        out.append(f"| {label(upload, support, sketch)} | {ms(ratio, '{:.3f}')} | {ms(per_seed(seeds, 'psnr'))} | "
                   f"{ms(per_seed(seeds, 'ssim'), '{:.2f}')} | {ms(per_seed(seeds, 'label_accuracy'), '{:.2f}')} | "
                   f"{ms(per_seed(seeds, 'i2f_psnr'))} | {ms(frac, '{:.3f}') if any(frac) else 'all'} | "
                   f"{ms(eps, '{:.2f}') if any(e is not None for e in eps) else '-'} | "
                   f"{ms(per_seed(seeds, 'wall_s'), '{:.0f}')} | {'; '.join(sorted(notes))} ({n} audits) |")
    return "\n".join(out)


def main(out: str) -> None:
    root = Path(out)
    tables = {"accuracy": accuracy_table, "accuracy_cnn": accuracy_table,
              "audit": lambda r: audit_table(r, sketch="de-sketch S^T y"),
              "audit_sketch": lambda r: audit_table(r, root / "audit", sketch="sketch space")}
    for name, table in tables.items():
        if not (root / name / "runs.csv").is_file():
            continue
        print(f"## {name}\n\n{table(root / name)}\n")
        shutil.copyfile(root / name / "runs.csv", HERE / f"{name}_runs.csv")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/uploads")
