"""runs.csv of a defense sweep -> a markdown table (mean ± std over seeds) and a CSV copy.

    .venv/bin/python experiments/defenses/tables.py runs/defenses/prune_noise [--out experiments/defenses/out]

Reads the sweep folder's runs.csv (``python -m fedsim sweep``) and, for the I2F column, each
run's audit.jsonl (runs.csv carries no ``i2f_psnr``). Writes ``<out>/<name>.csv`` (runs.csv
plus ``i2f_psnr``, ``attack_wall_s``) and ``<out>/<name>.md`` (the table), and prints the table.
Rows: one per setting (every swept key but ``seed`` and the attack); columns: final accuracy,
epsilon where a run has one, and per attack its PSNR / SSIM and I2F's predicted PSNR.
Accuracy comes from the attack's runs too (training does not depend on the attack: the
same seed gives the same accuracy, and each seed counts once).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

ATTACK_KEYS = ("audit.attack", "audit.attack_config")
SKIP = {"run", "seed"}
NAMES = {"dlg": "DLG", "ig": "IG", "dia": "DIA", "idlg": "iDLG", "sme": "SME"}


def _num(text: str):
    if text in ("", None):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def ms(values, fmt="{:.1f}") -> str:
    """mean ± std (sample std, n-1) over the non-missing values; one value (or one repeated) has no ± ."""
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    if len(v) == 1 or all(x == v[0] for x in v):  # one value, or the same in every seed (epsilon)
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ± {fmt.format(statistics.stdev(v))}"


def label(value) -> str:
    """A defense block or a plain value as a short cell."""
    if isinstance(value, dict):
        name = value.get("name", "")
        rest = ", ".join(f"{k} {v}" for k, v in value.items() if k != "name")
        return f"{name} ({rest})" if rest else name
    return str(value)


def audit_extra(run_dir: Path) -> dict:
    """i2f_psnr and the attack's wall time of the worst (highest-PSNR) audit row."""
    path = run_dir / "audit.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("psnr") is not None]
    if not rows:
        return {"i2f_psnr": None, "attack_wall_s": None}
    worst = max(rows, key=lambda r: r["psnr"])
    return {"i2f_psnr": worst.get("i2f_psnr"), "attack_wall_s": worst.get("wall_s")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the sweep's folder (holds runs.csv and runs/)")
    p.add_argument("--out", default=str(Path(__file__).parent / "out"))
    p.add_argument("--attack", default=None, help="the attack when the sweep does not vary it (from the base)")
    args = p.parse_args(argv)
    root = Path(args.sweep_dir)
    raw = list(csv.DictReader((root / "runs.csv").read_text().splitlines()))
    if not raw:
        raise SystemExit(f"{root}/runs.csv has no finished runs")
    for r in raw:
        r.update({k: ("" if v is None else repr(v) if isinstance(v, float) else str(v))
                  for k, v in audit_extra(root / "runs" / r["run"]).items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{root.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(raw[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(raw)

    first_metric = list(raw[0]).index("accuracy")
    keys = [k for k in list(raw[0])[:first_metric] if k not in SKIP and k not in ATTACK_KEYS]
    rows = [{k: _num(v) for k, v in r.items()} for r in raw]
    attacks = list(dict.fromkeys(r.get("audit.attack") or args.attack or "attack" for r in rows))
    has_eps = any(r.get("epsilon") is not None for r in rows)
    settings = list(dict.fromkeys(json.dumps([r.get(k) for k in keys]) for r in rows))

    head = [*keys, "seeds", "final accuracy"] + (["epsilon"] if has_eps else [])
    for a in attacks:
        n = NAMES.get(a, a)
        head += [f"{n} PSNR dB", f"{n} SSIM"]
    head += ["I2F predicted PSNR dB", "run wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in settings:
        group = [r for r in rows if json.dumps([r.get(k) for k in keys]) == s]
        by_seed = {r["seed"]: r for r in group}                       # one accuracy per seed
        cells = [label(v) for v in json.loads(s)]
        cells += [str(len(by_seed)), ms([r["accuracy"] for r in by_seed.values()], "{:.3f}")]
        if has_eps:
            cells.append(ms([r["epsilon"] for r in by_seed.values()], "{:.2f}"))
        for a in attacks:
            ar = [r for r in group if (r.get("audit.attack") or args.attack or "attack") == a]
            cells += [ms([r["audit_worst_psnr"] for r in ar]), ms([r["audit_worst_ssim"] for r in ar], "{:.2f}")]
        cells += [ms([r["i2f_psnr"] for r in group]), ms([r["wall_s"] for r in group], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / f"{root.name}.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
