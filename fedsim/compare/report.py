"""``python -m fedsim report DIR``: one self-contained HTML page for a run or a sweep.

For a run folder (summary.json, metrics.jsonl, audit.jsonl): accuracy per round, bytes per
round, epsilon per round (the accountant's, when a defense accounts one, and the canaries'
empirical estimate with its interval, when the scenario has a privacy section: one plot), the
audit's PSNR per round (and membership scores) and every reconstruction grid. For a sweep folder
(runs.csv, ``runs/<run>/``): the frontiers a comparison is about - accuracy against audit PSNR
(privacy-utility), accuracy against uploaded bytes (utility-communication), audit PSNR against
epsilon, the empirical epsilon against the accountant's, accuracy against membership AUC - as mean and standard
deviation over seeds of each setting (the swept keys other than ``seed``), the mean
accuracy curve of each setting, and the runs table.

Everything is inline (images as data: URIs, no scripts or styles fetched), so the page
opens without a network. Each plot is also written as a PNG beside ``report.html`` in
``report/``. The page's only script records, on load, how many images decoded and any
script error in ``<body data-...>`` attributes, so a headless browser can check it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..run.results import (DiskFullError, RunFileError, atomic_write, disk_full_as_error, draw_epsilon, has_epsilon,
                           read_json_object, read_jsonl, read_metrics)

MEMBERSHIP_TPR = "membership_tpr_at_0.1%_fpr"  # audit.jsonl's key (fedsim.audit.membership)
MARKERS = ("o", "s", "^", "D")  # with 10 colours: settings beyond 10 stay distinguishable
LINES = ("-", "--", ":", "-.")

_CHECK = """<script>
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; document.body.dataset.errors = window.__errors; });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.images = ok + '/' + imgs.length;
  document.body.dataset.errors = window.__errors;
});
</script>"""

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em;vertical-align:top} figcaption{font-size:12px;color:#555}
img{max-width:100%}
</style>"""


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` (and ``report/*.png``) for the run or sweep in ``path``; returns the page."""
    root = Path(path)
    if (root / "runs.csv").is_file() or (root / "summary.json").is_file():
        _check_writable(root)  # before anything is drawn: a read-only folder gets no half of a report
    if (root / "runs.csv").is_file():
        title, body = _sweep_body(root)
    elif (root / "summary.json").is_file():
        title, body = _run_body(root)
    else:
        raise FileNotFoundError(f"{root}: neither a run (summary.json) nor a sweep (runs.csv)")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h1>{html.escape(title)}</h1>{body}{_CHECK}</body></html>")
    atomic_write(root / "report.html", page)
    return root / "report.html"


def _check_writable(root: Path) -> None:
    """RunFileError naming report.html when ``root`` takes no new file (read-only, not ours)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".report.html.", suffix=".tmp")
    except OSError as exc:
        raise RunFileError(f"{root / 'report.html'}: cannot write the report ({exc.strerror or type(exc).__name__})") \
            from None
    os.close(fd)
    os.unlink(tmp)


# ----------------------------------------------------------------------------- plotting


def _plot(root: Path, name: str, draw: Callable[[Any], None], size=(5.5, 3.4)) -> str:
    """Draw one figure, save it as report/<name>.png, return an <img> with it inline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = root / "report" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    with disk_full_as_error(out):
        try:
            fig.savefig(tmp)
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            plt.close(fig)
    return _figure(out.read_bytes(), name.replace("_", " "))


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------- a run


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(path: Path, rows: list[dict[str, Any]], numbers: tuple[str, ...], optional: tuple[str, ...] = (),
                  integers: tuple[str, ...] = (), texts: tuple[str, ...] = ()) -> None:
    """RunFileError naming the file, the line and the key of the first row whose fields are not
    what fedsim writes there: ``numbers`` present as numbers, ``optional`` numbers or null if
    present, ``integers`` present as integers, ``texts`` present as strings."""
    for n, row in enumerate(rows, 1):
        for key in numbers + optional + integers + texts:
            if key not in row:
                if key in optional:
                    continue
                raise RunFileError(f"{path}: row {n} lacks {key!r}")
            value = row[key]
            ok = (isinstance(value, int) and not isinstance(value, bool) if key in integers
                  else isinstance(value, str) if key in texts
                  else _number(value) or (value is None and key in optional))
            if not ok:
                raise RunFileError(f"{path}: row {n}: {key} is {str(value)[:40]!r}, expected "
                                   f"{'an integer' if key in integers else 'text' if key in texts else 'a number'}")


def _interval(summary: dict[str, Any]) -> str | None:
    """The estimate's interval as text (an unbounded end: inf), or None without an estimate."""
    if "epsilon_est" not in summary:
        return None
    low, high = summary.get("epsilon_est_low"), summary.get("epsilon_est_high")
    return f"{_fmt(low) if low is not None else 0} .. {_fmt(high) if high is not None else 'inf'}"


def _audit_rows(run: Path) -> list[dict[str, Any]]:
    f = run / "audit.jsonl"
    if not f.is_file():
        return []
    rows = read_jsonl(f)
    _check_fields(f, rows, (), optional=("psnr", "ssim", "label_accuracy", "i2f_psnr", "cw_ssim", "membership_auc"),
                  integers=("round", "client"), texts=("attack", "threat"))
    for n, r in enumerate(rows, 1):  # a picture in audit/, by its plain name
        name = r.get("reconstruction")
        if name is not None and (not isinstance(name, str) or "/" in name or name in ("", ".", "..")):
            raise RunFileError(f"{f}: row {n}: reconstruction {str(name)[:40]!r} is not a file name in audit/")
    return rows


def _run_body(root: Path) -> tuple[str, str]:
    summary = read_json_object(root / "summary.json")
    rows = read_metrics(root)
    _check_fields(root / "metrics.jsonl", rows, ("accuracy", "bytes_up", "bytes_down"),
                  optional=("epsilon", "epsilon_est", "epsilon_est_low", "epsilon_est_high"))
    audit = _audit_rows(root)
    rounds = [r["round"] for r in rows]
    parts = [_table(["metric", "value"], [
        ["final accuracy", summary.get("accuracy")], ["best accuracy", summary.get("best_accuracy")],
        ["rounds", summary.get("rounds")], ["bytes up", summary.get("bytes_up_total")],
        ["bytes down", summary.get("bytes_down_total")], ["client failures", summary.get("failures_total")],
        ["epsilon", summary.get("epsilon")],
        ["empirical epsilon (canaries, " + str(summary.get("epsilon_est_threat", "-")) + ")", summary.get("epsilon_est")],
        ["empirical epsilon: interval", _interval(summary)],
        ["audit: worst PSNR (dB)", summary.get("audit_worst_psnr")],
        ["audit: worst membership AUC", summary.get("audit_worst_membership_auc")],
        ["audit: worst CW-SSIM", summary.get("audit_worst_cw_ssim")],
        ["wall time (s)", summary.get("wall_s")]])]

    def accuracy(ax):
        ax.plot(rounds, [r["accuracy"] for r in rows], marker=".")
        ax.set(xlabel="round", ylabel="central test accuracy")

    def traffic(ax):
        ax.plot(rounds, [r["bytes_up"] / 1e6 for r in rows], marker=".", label="up")
        ax.plot(rounds, [r["bytes_down"] / 1e6 for r in rows], marker=".", label="down")
        ax.set(xlabel="round", ylabel="MB per round")
        ax.legend(fontsize=8)

    parts += [_plot(root, "accuracy", accuracy), _plot(root, "bytes", traffic)]
    if has_epsilon(rows):  # the accountant's epsilon and the canaries' estimate, with its interval
        parts.append(_plot(root, "epsilon", lambda ax: draw_epsilon(ax, rows, summary.get("epsilon_est_threat"))))
    scored = [r for r in audit if r.get("psnr") is not None]
    if scored:
        def psnr(ax):
            ax.scatter([r["round"] for r in scored], [r["psnr"] for r in scored], s=14, label="audited client")
            by_round = sorted({r["round"] for r in scored})
            ax.plot(by_round, [max(r["psnr"] for r in scored if r["round"] == k) for k in by_round],
                    color="C3", marker=".", label="worst (max)")
            ax.set(xlabel="round", ylabel="audit PSNR (dB)")
            ax.legend(fontsize=8)
        parts.append(_plot(root, "audit_psnr", psnr))
    if audit:
        parts.append("<h2>Audit: reconstructions (truth on top)</h2>")
        member = any("membership_auc" in r for r in audit)  # membership inference's columns, when it ran
        parts.append(_table(["round", "client", "attack", "threat", "PSNR", "SSIM", "label acc", "I2F PSNR",
                             *(["membership AUC", "TPR at 0.1% FPR"] if member else [])],
                            [[r["round"], r["client"], r["attack"], r["threat"], r.get("psnr"), r.get("ssim"),
                              r.get("label_accuracy"), r.get("i2f_psnr"),
                              *([r.get("membership_auc"), r.get(MEMBERSHIP_TPR)] if member else [])] for r in audit]))
        for r in audit:
            png = root / "audit" / str(r.get("reconstruction", ""))
            if png.is_file():
                psnr_text = "no score" if r.get("psnr") is None else f"{r['psnr']:.1f} dB"
                parts.append(_figure(png.read_bytes(), f"round {r['round']}, client {r['client']}: {psnr_text}"))
    return f"fedsim run: {str(summary.get('name', root.name))[:200]}", "\n".join(parts)


# ----------------------------------------------------------------------------- a sweep


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _settings(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """Group runs by every swept key except ``seed`` (the spread is over seeds)."""
    from .runs_csv import COLUMNS

    keys = [k for k in rows[0] if k not in ("run", "seed", *COLUMNS)] if rows else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={_compact(r[k])}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(r)
    return keys, groups


def _compact(value: Any) -> str:
    """A swept value as a short label: a block as ``name(key=value, ...)``."""
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_compact(v)}" for k, v in value.items() if k != "name")
        return f"{value['name']}({inner})" if "name" in value else f"({inner})"
    return str(value)


def _sweep_body(root: Path) -> tuple[str, str]:
    from .runs_csv import COLUMNS, read_csv

    rows = read_csv(root)
    keys, groups = _settings(rows)
    parts = []
    stats = []
    for label, rs in groups.items():
        s = {"setting": label, "runs": len(rs)}
        for c in ("accuracy", "best_accuracy", "bytes_up_total", "epsilon", "epsilon_est", "audit_worst_psnr",
                  "audit_worst_ssim", "audit_worst_cw_ssim", "audit_worst_membership_auc"):
            s[c] = _mean_sd([r.get(c) for r in rs])
        stats.append(s)
    header = ["setting", "runs", "accuracy", "best accuracy", "MB up", "epsilon", "empirical epsilon",
              "audit worst PSNR", "audit SSIM", "audit CW-SSIM", "membership AUC"]

    def cell(ms, scale=1.0, digits=3):
        m, sd = ms
        return "-" if math.isnan(m) else f"{m * scale:.{digits}g} ± {sd * scale:.2g}"

    parts.append("<h2>Settings (mean ± std over seeds)</h2>")
    parts.append(_table(header, [[s["setting"], s["runs"], cell(s["accuracy"]), cell(s["best_accuracy"]),
                                  cell(s["bytes_up_total"], 1e-6), cell(s["epsilon"]), cell(s["epsilon_est"]),
                                  cell(s["audit_worst_psnr"]), cell(s["audit_worst_ssim"]),
                                  cell(s["audit_worst_cw_ssim"]), cell(s["audit_worst_membership_auc"])]
                                 for s in stats]))

    def frontier(xkey, ykey, xlabel, ylabel, xscale=1.0):
        def draw(ax):
            if (xkey, ykey) == ("epsilon", "epsilon_est"):  # the bound: an estimate above it is a finding
                both = [v for s in stats if not (math.isnan(s[xkey][0]) or math.isnan(s[ykey][0]))
                        for v in (s[xkey][0], s[ykey][0])]
                low, top = (min(both), max(both)) if min(both) > 0 else (0.0, max(both))
                ax.plot([low, top], [low, top], color="grey", lw=0.8, ls="--", label="estimate = accountant")
                if low > 0:  # epsilons span decades: log axes
                    ax.set(xscale="log", yscale="log")
            for i, s in enumerate(stats):
                (xm, xs), (ym, ys) = s[xkey], s[ykey]
                if math.isnan(xm) or math.isnan(ym):
                    continue
                ax.errorbar(xm * xscale, ym, xerr=xs * xscale, yerr=ys, fmt=MARKERS[i // 10 % len(MARKERS)],
                            color=f"C{i % 10}", capsize=3, label=s["setting"])
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        return draw

    wide = (9.0, 3.8)  # room for the legend beside the axes
    plots = [("audit_worst_psnr", "accuracy", "audit worst PSNR (dB)", "final accuracy", "privacy_utility"),
             ("bytes_up_total", "accuracy", "MB uploaded", "final accuracy", "utility_communication"),
             ("epsilon", "audit_worst_psnr", "epsilon", "audit worst PSNR (dB)", "psnr_epsilon"),
             ("epsilon", "epsilon_est", "accountant epsilon", "empirical epsilon (canaries)", "empirical_epsilon"),
             ("audit_worst_membership_auc", "accuracy", "membership AUC (worst)", "final accuracy",
              "membership_utility")]
    parts.append("<h2>Frontiers</h2>")
    for xkey, ykey, xl, yl, name in plots:
        if any(not math.isnan(s[xkey][0]) and not math.isnan(s[ykey][0]) for s in stats):
            parts.append(_plot(root, name, frontier(xkey, ykey, xl, yl, 1e-6 if xkey == "bytes_up_total" else 1.0),
                               size=wide))

    def curves(ax):
        for i, (label, rs) in enumerate(groups.items()):
            per_run = [[m["accuracy"] for m in read_metrics(root / "runs" / r["run"])] for r in rs]
            n = min(len(c) for c in per_run)
            mean = [statistics.fmean(c[k] for c in per_run) for k in range(n)]
            ax.plot(range(1, n + 1), mean, color=f"C{i % 10}", ls=LINES[i // 10 % len(LINES)], label=label)
        ax.set(xlabel="round", ylabel="central test accuracy (mean over seeds)")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)

    if rows:
        parts.append(_plot(root, "accuracy_curves", curves, size=wide))
    parts.append("<h2>Runs</h2>")
    parts.append(_table(["run", *keys, *(["seed"] if rows and "seed" in rows[0] else []), *COLUMNS],
                        [[r["run"], *(r[k] for k in keys), *([r["seed"]] if "seed" in r else []),
                          *(r.get(c) for c in COLUMNS)] for r in rows]))
    return f"fedsim sweep: {root.name}", "\n".join(parts)


def main(argv: list[str]) -> int:
    import sys

    from ..console import EXIT_BAD_INPUT, EXIT_FAILED, Parser

    p = Parser(prog="fedsim report", description="Write report.html for a run or a sweep folder.")
    p.add_argument("dir", help="a run folder (summary.json) or a sweep folder (runs.csv)")
    args = p.parse_args(argv)
    try:
        page = write_report(args.dir)
    except (FileNotFoundError, RunFileError) as exc:  # not a run or sweep; a run file fedsim did not write so
        print(f"fedsim: error: {str(exc).splitlines()[0][:500]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DiskFullError as exc:  # the report's earlier files (each written atomically) are intact
        print(f"fedsim: error: {exc}; free some space and run `fedsim report` again", file=sys.stderr)
        return EXIT_FAILED
    print(page)
    return 0
