"""Privacy-audit experiments (issue 9, "Results to reproduce", items 1 and 2); writes Markdown tables.

    python experiments/audit/run.py training|local|order|all [--seeds 0 1 2] [--jobs 2] [--out DIR] [--quick]

training  Leakage across training: FedAvg, 30 rounds, on digits (16x16) and patches (32x32),
          the server's audit (fedsim/audit/) attacks clients every 5th round, and round 1
          (a 1-round copy of the run: training does not depend on train.rounds, checked);
          gradient threat (IG on a batch-4 gradient, 2 clients a round) and update threat
          (unrolled IG on one client's whole upload: 8 samples, 2 local steps).
          Scenarios: training_digits.yaml, training_patches.yaml.
local     FedAvg's local work as a defense: update threat after E in {1, 2, 5} local epochs
          of batch B in {1, 4, 8} on 8 samples, at round 1 and round 5 (unrolled IG, 300
          iterations). Scenario: local_digits.yaml.
order     Why the audit's update-threat IG fails on multi-step updates (no FL run): one victim
          case attacked with recovered labels, the true labels sorted, and in schedule order.

Every update-threat job of the audit is also run a second time, outside the audit, with the
client's true labels given in the order its batch schedule uses them ("oracle labels"): the
audit's IG recovers a sorted label multiset from the update, and a multi-step replay needs
each sample's label at its own schedule position (see RESULTS.md). The audit's own rows are
those of audit.jsonl, untouched; the oracle rows come from the same job (same observation,
same attack and seed) with only ``observation.labels`` set, scored by the same ``run_job``.

Writes DIR/<name>.json (every run: settings, metrics, audit rows, wall times; rewritten
atomically after each run, so an interrupted experiment keeps its finished runs) and
DIR/<name>.md (the tables). Run directories go to runs/audit/<name>/ (not tracked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

TRAINING = {"digits": HERE / "training_digits.yaml", "patches": HERE / "training_patches.yaml"}
LOCAL = HERE / "local_digits.yaml"
UPDATE_THREAT = ["audit.threat=update", "audit.clients=1", "audit.batch_size=null",
                 "audit.attack_config.iterations=500"]
EPOCHS, BATCHES, LOCAL_ROUNDS = (1, 2, 5), (1, 4, 8), (1, 5)


# ----------------------------------------------------------------------------- one run (in a worker)


def run_one(job: dict) -> dict:
    """Run one scenario with its audit; return its metrics, audit rows and oracle-label rows."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from concurrent.futures import ProcessPoolExecutor as Pool

    import torch

    import fedsim.audit.observer as fa
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics
    from fedsim.scenario import load_scenario
    from fedsim.world import build_world

    jobs: list = []

    class Recording(Pool):
        """The audit's worker pool, keeping a copy of each job it is handed (this process only)."""

        def submit(self, fn, /, *args, **kwargs):
            jobs.append(args[0])
            return super().submit(fn, *args, **kwargs)

    fa.ProcessPoolExecutor = Recording
    torch.set_num_threads(1)
    scenario = load_scenario(job["scenario"], job["sets"])
    out = Path(job["out"])
    t0 = time.perf_counter()
    summary = run_scenario(scenario, out, progress=False)
    wall = time.perf_counter() - t0
    metrics = read_metrics(out)
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines() if line.strip()]
    oracle, t1 = [], time.perf_counter()
    for j in jobs:
        if j.observation.threat != "update" or j.true_labels is None:
            continue
        obs = dataclasses.replace(j.observation, labels=j.true_labels.clone())
        oj = dataclasses.replace(j, observation=obs, png=j.png.replace(".png", "-oracle.png"),
                                 note="oracle labels (true, in schedule order)")
        oracle.append(fa.run_job(oj))
    oracle_wall = time.perf_counter() - t1
    init_acc = None
    if scenario.train.rounds == 1:  # the attacked model of round 1 is the initial one: its accuracy
        world = build_world(scenario)
        with torch.no_grad():
            pred = world.new_model().eval()(world.dataset.x_test).argmax(1)
        init_acc = float((pred == world.dataset.y_test).float().mean())
    return {**{k: job[k] for k in ("key", "scenario", "sets")}, "out": str(out), "wall_s": wall,
            "oracle_wall_s": oracle_wall, "init_accuracy": init_acc,
            "accuracy": [r["accuracy"] for r in metrics], "train_loss": [r["train_loss"] for r in metrics],
            "local_steps": [r.get("train_metrics", {}).get("local_steps") for r in metrics],
            "audit": rows, "oracle": [_jsonable(r) for r in oracle],
            "audit_worst_psnr": summary.get("audit_worst_psnr")}


def _jsonable(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ----------------------------------------------------------------------------- statistics and tables


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 1) -> str:
    m, s = mean_sd(xs)
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(caption: str, columns: list[str], rows: list[str]) -> str:
    return (f"{caption}\n\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n"
            + "\n".join(rows))


def per_seed(runs: list[dict], field: str, source: str = "audit") -> dict[int, dict[int, float]]:
    """{seed: {round: mean over that round's audited clients of ``field``}} from a list of runs."""
    out: dict[int, dict[int, list[float]]] = {}
    for r in runs:
        for row in r[source]:
            if row.get(field) is not None:
                out.setdefault(r["seed"], {}).setdefault(row["round"], []).append(row[field])
    return {s: {rnd: statistics.fmean(v) for rnd, v in d.items()} for s, d in out.items()}


def column(d: dict[int, dict[int, float]], rnd: int) -> list[float]:
    return [v[rnd] for v in d.values() if rnd in v]


# ----------------------------------------------------------------------------- experiment: training


def training_jobs(seeds: list[int], runs_dir: Path, quick: bool) -> list[dict]:
    jobs = []
    for ds, path in TRAINING.items():
        for threat in ("gradient", "update"):
            for seed in seeds:
                for rounds in (1, 30):
                    sets = [f"seed={seed}", f"train.rounds={3 if quick and rounds == 30 else rounds}"]
                    sets += UPDATE_THREAT if threat == "update" else []
                    sets += ["audit.attack_config.iterations=10", "audit.every=3"] if quick else []
                    key = dict(exp="training", dataset=ds, threat=threat, seed=seed, rounds=rounds)
                    jobs.append({"key": key, "scenario": str(path), "sets": sets,
                                 "out": str(runs_dir / "training" / f"{ds}-{threat}" / f"seed{seed}" / f"r{rounds}")})
    return jobs


def _merge_round1(runs: list[dict]) -> dict[tuple, dict]:
    """One record per (dataset, threat, seed): the 30-round run plus the 1-round run's round 1."""
    merged: dict[tuple, dict] = {}
    full = {(r["key"]["dataset"], r["key"]["threat"], r["key"]["seed"]): r for r in runs if r["key"]["rounds"] != 1}
    for r in runs:
        k = (r["key"]["dataset"], r["key"]["threat"], r["key"]["seed"])
        if r["key"]["rounds"] != 1 or k not in full:
            continue
        f = full[k]
        check = abs(f["accuracy"][0] - r["accuracy"][0]) < 1e-12 and abs(f["train_loss"][0] - r["train_loss"][0]) < 1e-12
        # the attacked model of round R is the one sent in round R: accuracy after round R-1
        attacked_acc = {1: r["init_accuracy"], **{i + 2: a for i, a in enumerate(f["accuracy"][:-1])}}
        merged[k] = {"seed": k[2], "audit": r["audit"] + f["audit"], "oracle": r["oracle"] + f["oracle"],
                     "attacked_accuracy": attacked_acc, "round1_identical": check,
                     "final_accuracy": f["accuracy"][-1], "wall_s": f["wall_s"] + r["wall_s"],
                     "oracle_wall_s": f["oracle_wall_s"] + r["oracle_wall_s"]}
    return merged


def training_tables(runs: list[dict]) -> str:
    merged = _merge_round1(runs)
    parts = []
    for threat in ("gradient", "update"):
        recs = {ds: [m for (d, t, _), m in sorted(merged.items()) if d == ds and t == threat] for ds in TRAINING}
        if not any(recs.values()):
            continue
        rounds = sorted({row["round"] for ms in recs.values() for m in ms for row in m["audit"]})
        lines = []
        for rnd in rounds:
            cells = []
            for ds, ms in recs.items():
                acc = [m["attacked_accuracy"].get(rnd) for m in ms]
                psnr, ssim, lab = (column(per_seed(ms, f), rnd) for f in ("psnr", "ssim", "label_accuracy"))
                cells += [fmt(acc, 3), fmt(psnr), fmt(ssim, 2), fmt(lab, 2)]
                if threat == "update":
                    cells.append(fmt(column(per_seed(ms, "psnr", "oracle"), rnd)))
            lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
        cols = ["test acc of attacked model", "PSNR dB", "SSIM", "label acc"]
        if threat == "update":
            cols.append("PSNR, oracle labels")
        columns = ["round"] + [f"{ds}: {c}" for ds in recs for c in cols]
        n = max(len(ms) for ms in recs.values())
        what = ("gradient threat: IG (cosine + 1e-4 TV, 1000 iterations) on one batch-4 gradient at the round's "
                "global model, 2 clients a round" if threat == "gradient" else
                "update threat: unrolled IG (500 iterations) on one client's whole round-R upload (8 samples, "
                "1 epoch of batch 4 = 2 SGD steps, lr as trained; patches: 8, digits: 8 or 9 samples), 1 client a "
                "round; the oracle column gives IG the true labels in schedule order")
        parts.append(md_table(f"Leakage across 30 FedAvg rounds, {what}; mean ± std over {n} seeds of each seed's "
                              "mean over its audited clients", columns, lines))
        # paired: round 1 against the trained model (rounds 20-30), per seed
        pair = []
        for ds, ms in recs.items():
            for src in ("audit", "oracle") if threat == "update" else ("audit",):
                d = per_seed(ms, "psnr", src)
                diffs = [v[1] - statistics.fmean([v[r] for r in v if r >= 20]) for v in d.values()
                         if 1 in v and any(r >= 20 for r in v)]
                if diffs:
                    pair.append(f"| {ds} | {src} | {fmt(diffs)} | {sum(x > 0 for x in diffs)}/{len(diffs)} |")
        parts.append(md_table("PSNR(round 1, untrained) minus mean PSNR(rounds 20-30), per seed",
                              ["data", "labels", "difference dB (mean ± std)", "seeds where round 1 leaks more"],
                              pair))
        ok = all(m["round1_identical"] for ms in recs.values() for m in ms)
        parts.append(f"(Round 1 of each 30-round run and of its 1-round copy: identical accuracy and training loss: "
                     f"{'yes, every seed' if ok else 'NO - check the runs'}.)")
    return "\n\n".join(parts)


def training_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = _merge_round1(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110, sharey=True)
    for ax, ds in zip(axes, TRAINING):
        twin = ax.twinx()
        for threat, src, style in (("gradient", "audit", "C0"), ("update", "audit", "C3"), ("update", "oracle", "C1")):
            ms = [m for (d, t, _), m in sorted(merged.items()) if d == ds and t == threat]
            if not ms:
                continue
            d = per_seed(ms, "psnr", src)
            rounds = sorted({r for v in d.values() for r in v})
            mean = [mean_sd(column(d, r))[0] for r in rounds]
            sd = [mean_sd(column(d, r))[1] for r in rounds]
            label = {"gradient": "gradient b4, IG", "update": "update, IG"}[threat] + (
                " (oracle labels)" if src == "oracle" else "")
            ax.errorbar(rounds, mean, yerr=sd, color=style, marker=".", capsize=3, label=label)
            if threat == "gradient":
                acc_rounds = sorted({r for m in ms for r in m["attacked_accuracy"]})
                accs = [mean_sd([m["attacked_accuracy"].get(r) for m in ms])[0] for r in acc_rounds]
                twin.plot(acc_rounds, accs, color="C2", alpha=0.6, lw=1)
        twin.set_ylim(0, 1)
        twin.set_ylabel("test accuracy of the attacked model", color="C2", fontsize=8)
        ax.axhline(20, color="grey", lw=0.8, ls="--")
        ax.set_title(ds)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("audit PSNR dB (mean ± std over seeds)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- experiment: local


def local_jobs(seeds: list[int], runs_dir: Path, quick: bool) -> list[dict]:
    jobs = []
    for e in EPOCHS:
        for b in BATCHES:
            for seed in seeds:
                for rounds in LOCAL_ROUNDS:
                    sets = [f"seed={seed}", f"train.rounds={2 if quick and rounds > 1 else rounds}",
                            f"train.local_epochs={e}", f"train.batch_size={b}"]
                    sets += ["audit.attack_config.iterations=10"] if quick else []
                    key = dict(exp="local", epochs=e, batch=b, seed=seed, rounds=rounds)
                    jobs.append({"key": key, "scenario": str(LOCAL), "sets": sets,
                                 "out": str(runs_dir / "local" / f"E{e}-B{b}" / f"seed{seed}" / f"r{rounds}")})
    # longest first (cost grows with E * steps): keeps both workers busy to the end
    return sorted(jobs, key=lambda j: -j["key"]["epochs"] * math.ceil(8 / j["key"]["batch"]))


def local_tables(runs: list[dict]) -> str:
    parts = []
    rounds = sorted({r["key"]["rounds"] for r in runs})
    for rnd in rounds:
        lines, lab_lines = [], []
        for e in EPOCHS:
            cells, lab = [], []
            for b in BATCHES:
                rs = [r for r in runs if r["key"]["epochs"] == e and r["key"]["batch"] == b and r["key"]["rounds"] == rnd]
                audit = [row for r in rs for row in r["audit"]]
                orc = [row for r in rs for row in r["oracle"]]
                steps = sorted({e * math.ceil(row["images"] / b) for row in audit})
                cells.append(f"{fmt([x['psnr'] for x in audit])} / {fmt([x['psnr'] for x in orc])} "
                             f"({'/'.join(map(str, steps))} steps)")
                lab.append(f"{fmt([x['label_accuracy'] for x in audit], 2)}")
            lines.append(f"| E = {e} | " + " | ".join(cells) + " |")
            lab_lines.append(f"| E = {e} | " + " | ".join(lab) + " |")
        rs = [r for r in runs if r["key"]["rounds"] == rnd]
        n_seeds = len({r["key"]["seed"] for r in rs})
        sizes = sorted({row["images"] for r in rs for row in r["audit"]})
        acc = {(e, b): [r["accuracy"][-1] for r in rs if (r["key"]["epochs"], r["key"]["batch"]) == (e, b)]
               for e in EPOCHS for b in BATCHES}
        parts.append(md_table(
            f"Round {rnd}{' (untrained model)' if rnd == 1 else ''}: update-threat PSNR dB, audit (labels recovered) "
            f"/ oracle labels, mean ± std over {n_seeds} seeds (1 client each, {'/'.join(map(str, sizes))} samples)",
            ["local epochs"] + [f"B = {b}" for b in BATCHES], lines))
        parts.append(md_table(f"Round {rnd}: the audit's label accuracy (labels recovered from the update)",
                              ["local epochs"] + [f"B = {b}" for b in BATCHES], lab_lines))
        if rnd > 1:
            parts.append(md_table(f"Round {rnd}: central test accuracy after the round (mean over seeds)",
                                  ["local epochs"] + [f"B = {b}" for b in BATCHES],
                                  [f"| E = {e} | " + " | ".join(fmt(acc[(e, b)], 3) for b in BATCHES) + " |"
                                   for e in EPOCHS]))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- experiment: order


def exp_order(seeds: list[int], iterations: int = 500) -> tuple[str, dict]:
    """Labels in a multi-step update (no FL run): one victim case attacked with labels recovered
    and placed on the samples jointly (what the audit does, ``attacks.label_assignment``), recovered
    and left sorted (the behaviour before), the true multiset placed jointly, the true multiset
    sorted, and the true labels in schedule order. Two models: the sigmoid LeNet at its uniform
    init with lr 0.3 (recovered counts partly wrong) and at PyTorch's default init with lr 0.05
    (counts recovered exactly)."""
    import torch

    from attacks import build_attack
    from attacks.case import build_case
    from attacks.metrics import evaluate

    torch.set_num_threads(1)
    cases = {"uniform init, lr 0.3": ("uniform", 0.3), "default init, lr 0.05": ("default", 0.05)}
    variants = [("recovered, placed jointly (audit)", "recovered", "joint"),
                ("recovered, sorted (before)", "recovered", "sorted"),
                ("true multiset, placed jointly", "true-sorted", "joint"),
                ("true multiset, sorted", "true-sorted", "sorted"),
                ("true, in schedule order", "true", "sorted")]
    res: dict[str, dict[str, list]] = {c: {v[0]: [] for v in variants} for c in cases}
    for case_name, (init, lr) in cases.items():
        for s in seeds:
            case = build_case(model="lenet", dataset="digits", image_size=16, init=init, batch_size=8, seed=s,
                              threat="update", local_steps=2, lr=lr, local_batch_size=4, labels_known=True)
            obs = case.observation
            schedule = [torch.arange(0, 4), torch.arange(4, 8)]
            for name, labels, placement in variants:
                given = {"recovered": None, "true-sorted": torch.sort(obs.labels).values, "true": obs.labels}[labels]
                o = dataclasses.replace(obs, labels=given)
                attack = build_attack("ig", iterations=iterations, seed=s, label_assignment=placement)
                if labels == "true-sorted" and placement == "joint":
                    # place the true multiset the way the attack places a recovered one
                    from attacks.label_assignment import assign_labels
                    o = dataclasses.replace(o, labels=assign_labels(
                        obs, given, iterations=attack.assign_iterations, lr=attack.lr, tv=attack.tv,
                        gen=torch.Generator().manual_seed(s + 7919)))
                rec = attack.reconstruct(o)
                sc = evaluate(rec.images, case.images, rec.hard_labels(), case.labels)
                step_ok = sum(int(torch.minimum(torch.bincount(rec.hard_labels()[i], minlength=10),
                                                torch.bincount(obs.labels[i], minlength=10)).sum())
                              for i in schedule) / 8
                res[case_name][name].append({"seed": s, "psnr": sc["psnr"], "ssim": sc["ssim"],
                                             "label_accuracy": sc["label_accuracy"], "step_label_accuracy": step_ok,
                                             "wall_s": rec.wall_s})
                print("order", case_name, s, name, round(sc["psnr"], 1), step_ok, flush=True)
    md = []
    for case_name, by_variant in res.items():
        rows = [f"| {k} | {fmt([r['psnr'] for r in v])} | {fmt([r['ssim'] for r in v], 2)} | "
                f"{fmt([r['label_accuracy'] for r in v], 2)} | {fmt([r['step_label_accuracy'] for r in v], 2)} |"
                for k, v in by_variant.items()]
        md.append(md_table(
            f"Labels in a multi-step update: digits 16x16, sigmoid LeNet ({case_name}), 8 samples, 2 local SGD "
            f"steps of batch 4, unrolled IG {iterations} iterations (+250 placing the labels where placed "
            f"jointly); mean ± std over seeds {', '.join(map(str, seeds))}",
            ["labels given to IG", "PSNR dB", "SSIM", "label acc (multiset)", "label acc (per step)"], rows))
    return "\n\n".join(md), res


# ----------------------------------------------------------------------------- driver


def run_experiment(name: str, jobs: list[dict], workers: int, out: Path) -> list[dict]:
    from fedsim.run.results import atomic_write

    runs, t0 = [], time.perf_counter()
    load0 = os.getloadavg()
    raw_path = out / f"{name}.json"

    def save(done: bool) -> None:
        atomic_write(raw_path, json.dumps({"experiment": name, "complete": done, "jobs": len(jobs),
                                           "wall_s_total": time.perf_counter() - t0,
                                           "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                                           "runs": runs}, indent=1) + "\n")

    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, j): j for j in jobs}
        for fut in as_completed(futures):
            r = fut.result()
            r["seed"] = r["key"]["seed"]
            runs.append(r)
            psnr = [round(x["psnr"], 1) for x in r["audit"] if x.get("psnr") is not None]
            orc = [round(x["psnr"], 1) for x in r["oracle"] if x.get("psnr") is not None]
            print(f"[{time.perf_counter() - t0:6.0f} s] {r['key']} psnr {psnr} oracle {orc} "
                  f"acc {r['accuracy'][-1]:.3f} ({r['wall_s']:.0f} + {r['oracle_wall_s']:.0f} s)", flush=True)
            save(False)
    save(True)
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["training", "local", "order", "all"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: 0 1 2 (training), 0 1 (local)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each with its own attack process)")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "audit"), help="run directories")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2-3 rounds, 10 attack iterations")
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedsim.run.results import atomic_write

    out, runs_dir = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    for name in (["training", "local", "order"] if args.which == "all" else [args.which]):
        seeds = args.seeds or ([0, 1] if name == "local" else [0, 1, 2])
        t0 = time.perf_counter()
        if name == "order":
            md, res = exp_order(seeds, iterations=10 if args.quick else 500)
            md += f"\n\n({time.perf_counter() - t0:.0f} s wall; `python experiments/audit/run.py order`)\n"
            atomic_write(out / "order.json", json.dumps(res, indent=1) + "\n")
            atomic_write(out / "order.md", md)
            print(md, flush=True)
            continue
        make = training_jobs if name == "training" else local_jobs
        runs = run_experiment(name, make(seeds, runs_dir, args.quick), args.jobs, out)
        md = training_tables(runs) if name == "training" else local_tables(runs)
        if name == "training":
            training_plot(runs, out / "training.png")
        cmd = f"python experiments/audit/run.py {name} --seeds {' '.join(map(str, seeds))} --jobs {args.jobs}"
        md += (f"\n\n({time.perf_counter() - t0:.0f} s wall on this machine, {args.jobs} runs at a time, "
               f"load average {os.getloadavg()[0]:.1f} at the end; `{cmd}`)\n")
        atomic_write(out / f"{name}.md", md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
