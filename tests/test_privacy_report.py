"""Empirical privacy in a run's and a sweep's outputs (issue 24 item 1): the canaries' ``epsilon_est`` and the
membership scores reach runs.csv, and the report draws the accountant's epsilon and the estimate (with its
interval) against rounds in one plot, and the sweep's frontier of one against the other."""

import csv
import json

from fedsim.compare.report import write_report
from fedsim.compare.runs_csv import COLUMNS, more_figures, read_csv
from fedsim.compare.sweep import _cell, run_row
from tests.conftest import small_raw

MEMBERSHIP_TPR = "membership_tpr_at_0.1%_fpr"


def _run_folder(path, rows, summary=None, audit=None):
    """A run folder as fedsim writes it, by hand: metrics.jsonl ``rows`` (accuracy and bytes filled in)."""
    path.mkdir(parents=True)
    full = [{"accuracy": 0.5 + 0.01 * i, "bytes_up": 1000, "bytes_down": 1000, **r, "round": i}
            for i, r in enumerate(rows, 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full))
    base = {"name": "r", "accuracy": full[-1]["accuracy"], "best_accuracy": full[-1]["accuracy"], "rounds": len(rows),
            "bytes_up_total": 1000 * len(rows), "bytes_down_total": 1000 * len(rows), "failures_total": 0,
            "wall_s": 1.0}
    (path / "summary.json").write_text(json.dumps({**base, **(summary or {})}))
    if audit is not None:
        (path / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in audit))
    return path


def _audit_row(round_, client, auc, tpr, psnr=None):
    return {"round": round_, "client": client, "attack": "idlg", "threat": "gradient", "psnr": psnr,
            "membership_auc": auc, MEMBERSHIP_TPR: tpr}


def test_runs_csv_columns_carry_the_estimate_and_the_worst_membership_scores():
    assert {"epsilon", "epsilon_est", "epsilon_est_point", "epsilon_est_low", "epsilon_est_high",
            "epsilon_est_threat", "audit_worst_membership_auc", "audit_worst_membership_tpr",
            "membership_attack"} <= set(COLUMNS)
    summary = {"epsilon_est": 1.5, "epsilon_est_point": 2.5, "epsilon_est_low": 0.5, "epsilon_est_high": None,
               "epsilon_est_threat": "final"}
    audit = [_audit_row(1, 0, 0.55, 0.0), {**_audit_row(2, 1, 0.71, 0.02), "membership_attack": "lira"},
             {"round": 2, "client": 3, "psnr": 30.0}]
    assert more_figures(summary, audit) == {"epsilon_est": 1.5, "epsilon_est_point": 2.5, "epsilon_est_low": 0.5,
                                            "epsilon_est_high": None, "epsilon_est_threat": "final",
                                            "audit_worst_membership_auc": 0.71, "audit_worst_membership_tpr": 0.02,
                                            "membership_attack": "lira"}
    # a run without canaries or membership inference: every one of these cells empty
    assert set(more_figures({"accuracy": 0.9}, [{"round": 1, "client": 0, "psnr": 20.0}]).values()) == {None}


def test_run_row_reads_membership_from_unscored_audits(tmp_path):
    """The summary's audit_worst_membership_auc needs a scored reconstruction; runs.csv reads audit.jsonl."""
    run = _run_folder(tmp_path / "run", [{}], summary={"epsilon_est": None, "epsilon_est_threat": "all_iterates"},
                      audit=[_audit_row(1, 0, 0.62, 0.01), _audit_row(1, 1, 0.58, 0.03)])
    row = run_row(run)
    assert set(COLUMNS) <= set(row)
    assert row["audit_worst_membership_auc"] == 0.62 and row["audit_worst_membership_tpr"] == 0.03
    assert row["epsilon_est"] is None and row["epsilon_est_threat"] == "all_iterates"  # unbounded: an empty cell


def test_the_run_report_plots_accountant_and_estimate_with_either_or_both(tmp_path):
    both = _run_folder(tmp_path / "both", [
        {"epsilon": 2.0, "epsilon_est": 0.4, "epsilon_est_low": 0.1, "epsilon_est_high": 1.2},
        {"epsilon": 3.0},  # a round the estimate skipped (privacy.every)
        {"epsilon": 3.8, "epsilon_est": 0.9, "epsilon_est_low": 0.3, "epsilon_est_high": None}],  # open above
        summary={"epsilon": 3.8, "epsilon_est": 0.9, "epsilon_est_low": 0.3, "epsilon_est_high": None,
                 "epsilon_est_threat": "final", "audit_worst_membership_auc": 0.6},
        audit=[_audit_row(3, 0, 0.6, 0.0, psnr=12.0)])
    only_estimate = _run_folder(tmp_path / "estimate", [  # no defense: no accountant, an unbounded estimate
        {"epsilon_est": None, "epsilon_est_low": 25.0, "epsilon_est_high": None},
        {"epsilon_est": 40.0, "epsilon_est_low": 20.0, "epsilon_est_high": None}])
    only_accountant = _run_folder(tmp_path / "accountant", [{"epsilon": 1.0}, {"epsilon": 1.4}])
    neither = _run_folder(tmp_path / "neither", [{}, {}])
    for run in (both, only_estimate, only_accountant):
        page = write_report(run).read_text()
        assert (run / "report" / "epsilon.png").stat().st_size > 1000, run
        assert "alt='epsilon'" in page
    page = (both / "report.html").read_text()
    assert "empirical epsilon (canaries, final)" in page and "0.3 .. inf" in page
    assert "membership AUC" in page and "TPR at 0.1% FPR" in page
    write_report(neither)
    assert not (neither / "report" / "epsilon.png").exists()


def test_the_sweep_report_has_the_estimate_against_the_accountant(tmp_path):
    root = tmp_path / "sweep"
    runs, lines = [], []
    for z in (0.5, 2.0):
        for seed in (0, 1):
            name = f"z={z}__seed={seed}"
            eps, est = 10 / z, 1 / z + 0.1 * seed
            _run_folder(root / "runs" / name, [{"epsilon": eps, "epsilon_est": est}],
                        summary={"epsilon": eps, "epsilon_est": est, "epsilon_est_threat": "final"},
                        audit=[_audit_row(1, 0, 0.5 + 0.1 / z, 0.0, psnr=10.0)])
            runs.append(name)
            row = run_row(root / "runs" / name)
            lines.append([name, _cell(z), _cell(seed), *(_cell(row[c]) for c in COLUMNS)])
    with open(root / "runs.csv", "w", newline="") as f:  # as the sweep's write_csv writes it
        csv.writer(f, lineterminator="\n").writerows([["run", "z", "seed", *COLUMNS], *lines])
    rows = read_csv(root)
    assert [r["epsilon_est"] for r in rows] == [2.0, 2.1, 0.5, 0.6]
    page = write_report(root).read_text()
    for plot in ("empirical_epsilon", "membership_utility", "psnr_epsilon"):
        assert (root / "report" / f"{plot}.png").is_file(), plot
    assert "empirical epsilon" in page and "2.05 ± 0.071" in page  # z=0.5: mean ± std over the two seeds


def test_a_canary_run_reaches_runs_csv_and_the_report(tmp_path, one_torch_thread):
    """End to end, small: dp_user with canaries, its run row and its page."""
    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario

    raw = small_raw(train__rounds=2, defense={"name": "dp_user", "noise_multiplier": 1.0, "clipping_norm": 1.0},
                    privacy={"method": "canaries", "canaries": 40, "bootstrap": 10})
    summary = run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    row = run_row(tmp_path / "run")
    assert row["epsilon"] == summary["epsilon"] and row["epsilon_est"] == summary["epsilon_est"]
    assert row["epsilon_est_threat"] == "final" and row["audit_worst_membership_auc"] is None
    write_report(tmp_path / "run")
    assert (tmp_path / "run" / "report" / "epsilon.png").is_file()
