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
import io
import json
import math
import os
import statistics
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..run.results import (DiskFullError, RunFileError, atomic_write, disk_full_as_error, draw_accuracy_over_time,
                           draw_epsilon, has_epsilon, has_virtual_time,
                           read_json_object, read_jsonl, read_metrics)
from .readable import compact, format_bytes, format_db, format_fraction, format_seconds, section_of, settings_rows

MEMBERSHIP_TPR = "membership_tpr_at_0.1%_fpr"  # audit.jsonl's key (fedsim.audit.membership)
MARKERS = ("o", "s", "^", "D")  # with 10 colours: settings beyond 10 stay distinguishable
LINES = ("-", "--", ":", "-.")
PAIR_HEIGHT = 96  # each image of a truth/reconstruction pair is scaled up to at least this many pixels high

_CHECK = """<script>
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; document.body.dataset.errors = window.__errors; });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  imgs.forEach(function (i) {  // where each image is on screen: width x height + left edge, in CSS pixels
    var r = i.getBoundingClientRect();
    i.dataset.shown = Math.round(r.width) + 'x' + Math.round(r.height) + '+' + Math.round(r.left);
  });
  var page = document.documentElement;
  document.body.dataset.page = page.clientWidth + ' ' + page.scrollWidth;  // wider content would scroll sideways
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
.lead{color:#555;margin-top:-0.5em}
#settings td,#settings th,#results td{text-align:left} #results th{text-align:left;vertical-align:top}
.plots{display:flex;flex-wrap:wrap}
.plots figure{flex:0 1 48%;margin:0.5em 1% 0.5em 0} .plots img{width:100%}
.audit{margin:1.5em 0} .audit h3{font-size:15px;margin-bottom:0.3em} .audit h4{font-size:13px;margin:0.6em 0 0.3em}
.note{font-size:12px;color:#555;margin:0}
.pairs{display:flex;flex-wrap:wrap;gap:10px}
figure.pair{margin:0;text-align:center;border:1px solid #ddd;padding:4px;background:#fafafa}
figure.pair img{margin:0 2px;vertical-align:top;image-rendering:pixelated}
.strip{overflow-x:auto;max-width:100%} .strip img{max-width:none}
.more{font-size:12px}
#compared td{white-space:nowrap} #compared td:nth-child(2),#compared th:nth-child(2){text-align:left;white-space:normal}
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


def _plot(root: Path, name: str, draw: Callable[[Any], None], size=(5.5, 3.4), hover: str | None = None) -> str:
    """Draw one figure, save it as report/<name>.png, return an <img> with it inline (``hover``: its
    title, what a browser shows over it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=size, dpi=110)
    draw(ax)
    if ax.get_xlabel() == "round":  # rounds are whole numbers: no tick at round 1.2
        low, high = ax.get_xlim()
        if high - low < 2:  # one round only: its own tick (the locator would fall back to fractions)
            ax.set_xticks(range(math.ceil(low), math.floor(high) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    return _figure(out.read_bytes(), name.replace("_", " "), hover)


def _figure(png: bytes, caption: str, hover: str | None = None) -> str:
    data = base64.b64encode(png).decode()
    title = f" title='{html.escape(hover)}'" if hover else ""
    return (f"<figure><img alt='{html.escape(caption)}'{title} src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


class _Html(str):
    """A table cell that is markup already (not escaped again)."""


def _table(header: list[str], rows: list[list[Any]], id: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v if isinstance(v, _Html) else html.escape(_fmt(v))}</td>" for v in row)
                   + "</tr>" for row in rows)
    ident = f" id='{id}'" if id else ""
    return f"<div style='overflow-x:auto'><table{ident}><tr>{head}</tr>{body}</table></div>"


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
    """The point estimate's bootstrap interval as text (an unbounded end: inf), or None without an estimate."""
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
    for n, r in enumerate(rows, 1):  # pictures in audit/, by their plain names
        for key in ("reconstruction", "pairs"):
            name = r.get(key)
            if name is not None and (not isinstance(name, str) or "/" in name or name in ("", ".", "..")):
                raise RunFileError(f"{f}: row {n}: {key} {str(name)[:40]!r} is not a file name in audit/")
    return rows


def _run_body(root: Path) -> tuple[str, str]:
    summary = read_json_object(root / "summary.json")
    rows = read_metrics(root)
    _check_fields(root / "metrics.jsonl", rows, ("accuracy", "bytes_up", "bytes_down"),
                  optional=("epsilon", "epsilon_est", "epsilon_est_point", "epsilon_est_low", "epsilon_est_high"))
    audit = _audit_rows(root)
    pairs = [_pairs_of(root, r) for r in audit]  # read before anything is drawn: a torn file leaves no half report
    rounds = [r["round"] for r in rows]
    scenario = summary.get("scenario") if isinstance(summary.get("scenario"), dict) else {}
    name = str(summary.get("name", scenario.get("name", root.name)))[:200]
    lead = [f"scenario {name!r}" if name != root.name else "", f"{summary.get('rounds', len(rows))} rounds",
            f"wall time {format_seconds(summary.get('wall_s'))}" if _number(summary.get("wall_s")) else ""]
    parts = [f"<p class='lead'>{html.escape(', '.join(filter(None, lead)))}</p>", "<h2>Settings</h2>"]
    settings = settings_rows(scenario)
    parts.append(_table(["section", "what was run"], [list(r) for r in settings], id="settings") if settings else
                 "<p>summary.json holds no scenario: the settings of this run are not recorded.</p>")
    parts += ["<h2>Utility, communication, privacy</h2>", _results_table(summary, rows, audit)]

    def accuracy(ax):
        ax.plot(rounds, [r["accuracy"] for r in rows], marker=".")
        ax.set(xlabel="round", ylabel="central test accuracy")

    def traffic(ax):
        ax.plot(rounds, [r["bytes_up"] / 1e6 for r in rows], marker=".", label="up")
        ax.plot(rounds, [r["bytes_down"] / 1e6 for r in rows], marker=".", label="down")
        ax.set(xlabel="round", ylabel="MB per round")
        ax.legend(fontsize=8)

    plots = [_plot(root, "accuracy", accuracy), _plot(root, "bytes", traffic)]
    if has_virtual_time(rows):  # a system section: accuracy against the federation's (virtual) time
        plots.append(_plot(root, "accuracy_time", lambda ax: draw_accuracy_over_time(ax, rows)))
    if has_epsilon(rows):  # the accountant's epsilon and the canaries' estimate, with its interval
        plots.append(_plot(root, "epsilon", lambda ax: draw_epsilon(ax, rows, summary.get("epsilon_est_threat"))))
    scored = [r for r in audit if r.get("psnr") is not None]
    if scored:
        def psnr(ax):
            ax.scatter([r["round"] for r in scored], [r["psnr"] for r in scored], s=14, label="audited client")
            by_round = sorted({r["round"] for r in scored})
            ax.plot(by_round, [max(r["psnr"] for r in scored if r["round"] == k) for k in by_round],
                    color="C3", marker=".", label="worst (max)")
            ax.set(xlabel="round", ylabel="audit PSNR (dB)")
            ax.legend(fontsize=8)
        plots.append(_plot(root, "audit_psnr", psnr))
    parts.append(f"<div class='plots'>{''.join(plots)}</div>")
    if audit:
        parts.append(_audit_section(root, audit, pairs))
    return f"fedsim run: {root.name}", "\n".join(parts)


def _results_table(summary: dict[str, Any], rows: list[dict[str, Any]], audit: list[dict[str, Any]]) -> str:
    """The run's final figures, each with its unit, grouped: what the model learned, what it cost
    on the wire, what leaked; a figure the run did not measure is left out."""
    def number(key):
        value = summary.get(key)
        return value if _number(value) else None

    up = number("bytes_up_total")
    utility = [("final accuracy", format_fraction(number("accuracy"))),
               ("best accuracy", format_fraction(number("best_accuracy"))),
               ("accuracy before training", format_fraction(number("initial_accuracy"))),
               ("final loss", _fmt(number("loss")))]
    communication = [("uploaded, all clients", format_bytes(up)),
                     ("downloaded, all clients", format_bytes(number("bytes_down_total"))),
                     ("uploaded per round (mean)", format_bytes(up / len(rows)) if up is not None and rows else "-"),
                     ("client failures", _fmt(summary.get("failures_total")))]
    privacy = [("epsilon (accountant)", _fmt(number("epsilon"))),
               ("empirical epsilon (canaries, " + str(summary.get("epsilon_est_threat", "-")) + ")"
                + (": 95% lower bound" if "epsilon_est_point" in summary else ""), _fmt(number("epsilon_est"))),
               *([("empirical epsilon: point estimate (paper)", _fmt(number("epsilon_est_point")))]
                 if "epsilon_est_point" in summary else []),
               ("empirical epsilon: " + ("point estimate's interval" if "epsilon_est_point" in summary
                                         else "interval"), _interval(summary) or "-"),
               ("audit: worst PSNR", format_db(number("audit_worst_psnr"))
                + (f" (round {summary['audit_worst_psnr_round']}, client {summary['audit_worst_psnr_client']})"
                   if "audit_worst_psnr_round" in summary else "")),
               ("audit: worst SSIM", _fmt(number("audit_worst_ssim"))),
               ("audit: worst CW-SSIM", _fmt(number("audit_worst_cw_ssim"))),
               ("audit: worst membership AUC", _fmt(number("audit_worst_membership_auc"))),
               ("audits", str(len(audit)) if audit else "-")]
    run = [("rounds", _fmt(summary.get("rounds"))), ("wall time", format_seconds(number("wall_s"))),
           ("engine", _fmt(summary.get("engine")))]
    body = []
    for area, figures in (("utility", utility), ("communication", communication), ("privacy", privacy),
                          ("run", run)):
        shown = [(k, v) for k, v in figures if not v.startswith("-")]
        if not shown:
            shown = [("not measured", "-")]
        for i, (k, v) in enumerate(shown):
            head = f"<th rowspan='{len(shown)}'>{area}</th>" if i == 0 else ""
            body.append(f"<tr>{head}<td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>")
    return f"<table id='results'>{''.join(body)}</table>"


def _audit_section(root: Path, audit: list[dict[str, Any]], pairs: list[dict[str, Any] | None]) -> str:
    """The audits' table, then each audit's reconstructions as truth/reconstruction pairs: the best and
    the worst reconstructed (attacks.pictures.save_pairs), each image scaled up, its PSNR under it."""
    member = any("membership_auc" in r for r in audit)  # membership inference's columns, when it ran

    def db(v):
        return "-" if v is None else "exact" if math.isinf(v) else f"{v:.1f}"

    parts = ["<h2>Privacy audit</h2>",
             _table(["round", "client", "attack", "threat", "images", "PSNR (dB)", "SSIM", "label accuracy",
                     "I2F PSNR (dB)", "attack time (s)", *(["membership AUC", "TPR at 0.1% FPR"] if member else [])],
                    [[r["round"], r["client"], r["attack"], r["threat"], r.get("images"), db(r.get("psnr")),
                      r.get("ssim"), r.get("label_accuracy"), db(r.get("i2f_psnr")),
                      None if not _number(r.get("wall_s")) else f"{r['wall_s']:.2f}",
                      *([r.get("membership_auc"), r.get(MEMBERSHIP_TPR)] if member else [])] for r in audit]),
             "<p>Reconstructions: each pair is the client's true image (left) and the attack's reconstruction "
             f"(right), its PSNR under it: a few per audit, the best and the worst reconstructed. "
             "Every pair of an audit is in its grid under audit/.</p>"]
    for r, kept in zip(audit, pairs):
        parts.append(_audit_pictures(root, r, kept))
    return "\n".join(parts)


def _pairs_of(root: Path, row: dict[str, Any]) -> dict[str, Any] | None:
    """The audit row's pairs (``_read_pairs``); None for a row without them (an older fedsim's) or a file gone."""
    path = root / "audit" / str(row.get("pairs", ""))
    return _read_pairs(path) if row.get("pairs") is not None and path.is_file() else None


def _audit_pictures(root: Path, row: dict[str, Any], kept: dict[str, Any] | None) -> str:
    grid = root / "audit" / str(row.get("reconstruction", ""))
    head = (f"round {row['round']}, client {row['client']}: {row['attack']} on the {row['threat']} threat, "
            f"{_fmt(row.get('images'))} images, mean PSNR {format_db(row.get('psnr'))}")
    parts = [f"<section class='audit'><h3>{html.escape(head)}</h3>"]
    if row.get("note"):
        parts.append(f"<p class='note'>{html.escape(str(row['note']))}</p>")
    if kept is not None:
        best = int(kept["best"])
        groups = [("best reconstructed (highest PSNR first)", range(best)),
                  ("worst reconstructed (lowest PSNR first)", range(best, len(kept["index"])))]
        if "truth" not in kept:
            groups = [("reconstructions (not scored: the server holds no ground truth)", range(len(kept["index"])))]
        elif best == len(kept["index"]):
            groups = [("every image, best reconstructed first", range(best))]
        for title, idx in groups:
            if len(idx):
                parts.append(f"<h4>{html.escape(title)}</h4><div class='pairs'>"
                             + "".join(_pair(kept, i) for i in idx) + "</div>")
    elif grid.is_file():  # a run from before the pairs were kept: the whole grid at its own size
        parts.append("<p>This run kept no per-image pairs (an older fedsim): the whole grid, truth on top; "
                     "scroll sideways.</p><div class='strip'>"
                     + _image(grid.read_bytes(), f"round {row['round']}, client {row['client']}", "grid") + "</div>")
    if grid.is_file():
        link = f"audit/{grid.name}"
        parts.append(f"<p class='more'>All pairs: <a href='{html.escape(link)}'>{html.escape(link)}</a></p>")
    parts.append("</section>")
    return "".join(parts)


def _pair(kept: dict[str, Any], i: int) -> str:
    n = int(kept["index"][i])
    images = ([_image(_upscaled(kept["truth"][i]), f"truth {n}", "truth")] if "truth" in kept else []) + \
             [_image(_upscaled(kept["reconstruction"][i]), f"reconstruction {n}", "reconstruction")]
    caption = f"#{n}" + (f": {format_db(float(kept['psnr'][i]))}" if "psnr" in kept else "")
    return f"<figure class='pair'><div>{''.join(images)}</div><figcaption>{html.escape(caption)}</figcaption></figure>"


def _image(png: bytes, alt: str, kind: str) -> str:
    return f"<img class='{kind}' alt='{html.escape(alt)}' title='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _upscaled(pixels: np.ndarray) -> bytes:
    """An image (H x W x C, uint8) as a PNG scaled up by a whole factor (each pixel a square block,
    nothing blurred) to at least PAIR_HEIGHT pixels high: a 16-pixel digit is readable."""
    from PIL import Image

    scale = max(1, math.ceil(PAIR_HEIGHT / pixels.shape[0]))
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    img = img.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _read_pairs(path: Path) -> dict[str, Any]:
    """The arrays attacks.pictures.save_pairs writes, checked: a file fedsim did not write so is a
    RunFileError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            kept = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunFileError(f"{path}: not an audit's pairs ({type(exc).__name__})") from None
    n = len(kept.get("index", ()))
    rec = kept.get("reconstruction")
    ok = ("best" in kept and kept["best"].shape == () and 0 <= int(kept["best"]) <= n and rec is not None
          and rec.dtype == np.uint8 and rec.ndim == 4 and len(rec) == n and rec.shape[3] in (1, 3)
          and rec.shape[1] > 0 and ("truth" not in kept or kept["truth"].shape == rec.shape and
                                    kept["truth"].dtype == np.uint8)
          and ("psnr" not in kept or kept["psnr"].shape == (n,)))
    if not ok:
        raise RunFileError(f"{path}: not an audit's pairs (arrays of other names, shapes or types)")
    return kept


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
        label = ", ".join(f"{k}={compact(r[k])}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(r)
    return keys, groups


LEGEND_CHARS = 60  # a setting's label in a plot's legend, at most (the settings table has it whole)
SYMBOLS = {"o": "\u25cf", "s": "\u25a0", "^": "\u25b2", "D": "\u25c6"}  # MARKERS as text, for the key column
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")  # matplotlib's C0..C9


def _legend_label(i: int, label: str) -> str:
    """'S3: defense=prune(ratio=0.5)': the setting's key (as in the settings table) and its label, cut short."""
    text = f"S{i + 1}: {label}"
    return text if len(text) <= LEGEND_CHARS else text[:LEGEND_CHARS - 1] + "\u2026"


def _swatch(i: int) -> _Html:
    """The settings table's key cell: the marker and colour the setting has in every plot, and its key."""
    return _Html(f"<span style='color:{TAB10[i % 10]}'>{SYMBOLS[MARKERS[i // 10 % len(MARKERS)]]}</span>"
                 f"&nbsp;S{i + 1}")


def _base_settings(root: Path, rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The settings every run shares, read from the first run's summary.json (the swept keys vary)."""
    for r in rows:
        summary = root / "runs" / str(r["run"]) / "summary.json"
        if summary.is_file():
            scenario = read_json_object(summary).get("scenario")
            if isinstance(scenario, dict):
                swept = [*keys, *(["seed"] if "seed" in r else [])]
                varied = {section_of(k) for k in swept}
                table = [[section, f"swept (here: {text})" if section in varied else text]
                         for section, text in settings_rows(scenario)]
                return (f"<h2>Settings of every run</h2><p>As run in runs/{html.escape(str(r['run']))}; "
                        f"the sweep varies {html.escape(', '.join(swept) or 'nothing')}.</p>"
                        + _table(["section", "what was run"], table, id="settings"))
    return ""


def _sweep_body(root: Path) -> tuple[str, str]:
    from .runs_csv import COLUMNS, read_csv

    rows = read_csv(root)
    keys, groups = _settings(rows)
    parts = [_base_settings(root, rows, keys)]
    stats = []
    for label, rs in groups.items():
        s = {"setting": label, "runs": len(rs)}
        for c in ("accuracy", "best_accuracy", "bytes_up_total", "epsilon", "epsilon_est", "audit_worst_psnr",
                  "audit_worst_ssim", "audit_worst_cw_ssim", "audit_worst_membership_auc"):
            s[c] = _mean_sd([r.get(c) for r in rs])
        stats.append(s)
    header = ["key", "setting", "runs", "accuracy", "best accuracy", "uploaded (MB)", "epsilon", "empirical epsilon",
              "audit worst PSNR (dB)", "audit SSIM", "audit CW-SSIM", "membership AUC"]

    def cell(ms, scale=1.0, digits=3):
        m, sd = ms
        return "-" if math.isnan(m) else f"{m * scale:.{digits}g} ± {sd * scale:.2g}"

    parts.append("<h2>Settings compared (mean ± std over seeds)</h2>")
    parts.append(_table(header, [[_swatch(i), s["setting"], s["runs"], cell(s["accuracy"]), cell(s["best_accuracy"]),
                                  cell(s["bytes_up_total"], 1e-6), cell(s["epsilon"]), cell(s["epsilon_est"]),
                                  cell(s["audit_worst_psnr"]), cell(s["audit_worst_ssim"]),
                                  cell(s["audit_worst_cw_ssim"]), cell(s["audit_worst_membership_auc"])]
                                 for i, s in enumerate(stats)], id="compared"))
    hover = "\n".join(f"S{i + 1}: {s['setting']}" for i, s in enumerate(stats))

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
                            color=f"C{i % 10}", capsize=3, label=_legend_label(i, s["setting"]))
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        return draw

    wide = (9.0, 3.8)  # room for the legend beside the axes
    plots = [("audit_worst_psnr", "accuracy", "audit worst PSNR (dB)", "final accuracy", "privacy_utility"),
             ("bytes_up_total", "accuracy", "uploaded, all clients (MB)", "final accuracy", "utility_communication"),
             ("epsilon", "audit_worst_psnr", "epsilon", "audit worst PSNR (dB)", "psnr_epsilon"),
             ("epsilon", "epsilon_est", "accountant epsilon", "empirical epsilon (canaries)", "empirical_epsilon"),
             ("audit_worst_membership_auc", "accuracy", "membership AUC (worst)", "final accuracy",
              "membership_utility")]
    parts.append("<h2>Frontiers</h2><p>Each point a setting (its key as in the table above; hover over a plot for "
                 "all of them), the mean over seeds with bars of one standard deviation.</p>")
    for xkey, ykey, xl, yl, name in plots:
        if any(not math.isnan(s[xkey][0]) and not math.isnan(s[ykey][0]) for s in stats):
            parts.append(_plot(root, name, frontier(xkey, ykey, xl, yl, 1e-6 if xkey == "bytes_up_total" else 1.0),
                               size=wide, hover=hover))

    def curves(ax):
        for i, (label, rs) in enumerate(groups.items()):
            per_run = [[m["accuracy"] for m in read_metrics(root / "runs" / r["run"])] for r in rs]
            n = min(len(c) for c in per_run)
            mean = [statistics.fmean(c[k] for c in per_run) for k in range(n)]
            ax.plot(range(1, n + 1), mean, color=f"C{i % 10}", ls=LINES[i // 10 % len(LINES)],
                    label=_legend_label(i, label))
        ax.set(xlabel="round", ylabel="central test accuracy (mean over seeds)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)

    def time_curves(ax):  # one line per run (seeds differ in their clocks): accuracy against virtual time
        for i, (label, rs) in enumerate(groups.items()):
            for j, r in enumerate(rs):
                timed = [m for m in read_metrics(root / "runs" / r["run"]) if m.get("virtual_time_s") is not None]
                ax.plot([m["virtual_time_s"] for m in timed], [m["accuracy"] for m in timed], color=f"C{i % 10}",
                        ls=LINES[i // 10 % len(LINES)], label=_legend_label(i, label) if j == 0 else None)
        ax.set(xlabel="virtual time (s)", ylabel="central test accuracy (each run)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)

    if rows:
        parts.append(_plot(root, "accuracy_curves", curves, size=wide, hover=hover))
        if any(has_virtual_time(read_metrics(root / "runs" / r["run"])) for r in rows):
            parts.append(_plot(root, "accuracy_time", time_curves, size=wide, hover=hover))
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
