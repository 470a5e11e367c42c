"""`fedsim sweep` and `fedsim report`: a grid of runs, resumable, its CSV, and a page a browser renders."""

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from fedsim.compare.report import write_report
from fedsim.compare.sweep import expand, load_sweep, read_csv, run_name, run_sweep, SweepFile
from tests.conftest import small_raw

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def _sweep_file(tmp_path, **sweep):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_raw(train__rounds=2)))
    spec = {"name": "tiny", "base": "base.yaml", "set": {"train.rounds": 2},
            "grid": {"train.lr": [0.05, 0.2], "seed": [0, 1]}, **sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_and_zip_expand_in_order_and_name_runs_stably():
    s = SweepFile(name="s", base="b.yaml", grid={"a": [1, 2], "seed": [0, 1]}, zip={"x": [5, 6], "y": ["p", "q"]})
    runs = expand(s)
    assert len(runs) == 8
    assert runs[0] == {"a": 1, "seed": 0, "x": 5, "y": "p"} and runs[1] == {"a": 1, "seed": 0, "x": 6, "y": "q"}
    assert run_name(runs[0]) == "a=1__seed=0__x=5__y=p"
    assert run_name({"defense": {"name": "noise", "variance": 0.01}}) == run_name({"defense": {"variance": 0.01, "name": "noise"}})


@pytest.mark.fast  # the fast set's sweep (tests/conftest.py): one Ray start-up, two one-round runs
def test_a_one_round_sweep_runs_each_setting_once(tmp_path):
    sweep, runs = load_sweep(_sweep_file(tmp_path, set={"train.rounds": 1}, grid={"train.lr": [0.05, 0.2]}))
    root = run_sweep(sweep, runs, tmp_path / "out", workers=1, progress=False)
    rows = read_csv(root)
    assert [r["run"] for r in rows] == [r.name for r in runs] and len(rows) == 2
    for row, run in zip(rows, runs):
        summary = json.loads((root / "runs" / run.name / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["scenario"]["train"]["lr"] == row["train.lr"] == run.values["train.lr"]
        assert row["accuracy"] == summary["accuracy"]
    assert (root / "report.html").is_file()


def test_a_sweep_runs_every_setting_and_its_csv_equals_each_runs_summary(tmp_path):
    sweep, runs = load_sweep(_sweep_file(tmp_path))
    root = run_sweep(sweep, runs, tmp_path / "out", workers=2, progress=False)
    rows = read_csv(root)
    assert [r["run"] for r in rows] == [r.name for r in runs] and len(rows) == 4
    for row, run in zip(rows, runs):
        summary = json.loads((root / "runs" / run.name / "summary.json").read_text())
        assert row["train.lr"] == run.values["train.lr"] and row["seed"] == run.values["seed"]
        assert summary["scenario"]["train"]["lr"] == run.values["train.lr"] and summary["scenario"]["seed"] == row["seed"]
        for key in ("accuracy", "best_accuracy", "bytes_up_total", "bytes_down_total", "failures_total", "wall_s"):
            assert row[key] == summary[key], key
    assert len({r["accuracy"] for r in rows}) > 1  # the settings really differ
    assert (root / "report.html").is_file() and (root / "report" / "utility_communication.png").is_file()

    # Interrupted: one run lost its summary (killed mid-run), one is stale (another scenario in its folder).
    lost, stale = runs[1].name, runs[2].name
    (root / "runs" / lost / "summary.json").unlink()
    summary_path = root / "runs" / stale / "summary.json"
    edited = json.loads(summary_path.read_text())
    edited["scenario"]["train"]["lr"] = 123.0
    summary_path.write_text(json.dumps(edited))
    kept = {r.name: (root / "runs" / r.name / "summary.json").stat().st_mtime_ns for r in runs
            if r.name not in (lost, stale)}
    run_sweep(sweep, runs, tmp_path / "out", workers=1, progress=False)
    for name, mtime in kept.items():
        assert (root / "runs" / name / "summary.json").stat().st_mtime_ns == mtime  # not redone
    again = read_csv(root)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]  # redone runs give the same figures
    assert json.loads(summary_path.read_text())["scenario"]["train"]["lr"] == runs[2].values["train.lr"]


@pytest.mark.parametrize("change, message", [
    ({"grid": {"train.lr": [0.1, -1.0]}}, "sweep run train.lr=-1.0: train.lr"),
    ({"zip": {"train.lr": [0.1, 0.2], "seed": [0]}}, "zip lists differ in length"),
    ({"base": "missing.yaml"}, "scenario file not found"),
    ({"grid": {"strategy.name": ["fedavg", "nope"]}}, "sweep run strategy.name=nope"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_sweep_is_one_line_exit_2_and_nothing_runs(tmp_path, change, message):
    path = _sweep_file(tmp_path, **change)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedsim", "sweep", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class _Shown(HTMLParser):
    """The images of a page dumped after its script ran: class, alt, title and where each is on screen
    (``data-shown``: width x height + left edge, CSS pixels)."""

    def __init__(self):
        super().__init__()
        self.images, self.body, self.ids = [], {}, set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        if tag == "img":
            size, left = a["data-shown"].split("+")
            width, height = map(int, size.split("x"))
            self.images.append({"class": a.get("class"), "title": a.get("title"), "width": width, "height": height,
                                "right": int(left) + width})


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (CI installs it)")
def test_the_report_renders_in_a_headless_browser_with_every_image(tmp_path):
    """A run with an audit (LeNet, prune 0.5, IG on the update every 2 rounds, as issue 25 tried it) and a
    sweep, as a person sees them in a 1200-pixel-wide window: no script error, every image decoded, the
    settings named, figures with their units, reconstructions as truth/reconstruction pairs each at least
    64 pixels high and nothing wider than the window; and screenshots that are not blank."""
    from PIL import Image

    from fedsim.engines import run_scenario
    from fedsim.scenario import parse_scenario

    raw = small_raw(train__rounds=2, model={"name": "lenet", "init": "uniform"}, data__image_size=16,
                    data__num_clients=40, train__batch_size=4, defense={"name": "prune", "ratio": 0.5})
    raw["audit"] = {"attack": "ig", "every": 2, "clients": 1, "attack_config": {"iterations": 5}}
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    pages = [write_report(tmp_path / "run")]
    sweep, runs = load_sweep(_sweep_file(tmp_path, grid={"train.lr": [0.05, 0.2]}))
    pages.append(run_sweep(sweep, runs, tmp_path / "out", workers=1, progress=False) / "report.html")
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               "--window-size=1200,1600"]
    shown = []
    for page in pages:
        dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        seen = _Shown()
        seen.feed(dom)
        loaded, total = map(int, seen.body["data-images"].split("/"))
        assert total >= 2 and loaded == total, seen.body
        assert seen.body["data-errors"] == "0", seen.body
        window, content = map(int, seen.body["data-page"].split())
        assert content <= window and all(i["right"] <= window for i in seen.images), (window, content, seen.images)
        assert "settings" in seen.ids  # the settings table (the sweep's: those every run shares)
        shown.append(seen)
        shot = tmp_path / f"{page.parent.name}.png"
        subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
        pixels = Image.open(shot).convert("L").getextrema()
        assert pixels[1] - pixels[0] > 100  # text and plots, not a blank page
    run, swept = shown
    truths = [i for i in run.images if i["class"] == "truth"]
    recons = [i for i in run.images if i["class"] == "reconstruction"]
    assert len(truths) == len(recons) == 10  # the 5 best and 5 worst of the client's 32 images
    assert min(i["height"] for i in recons + truths) >= 64
    run_page = pages[0].read_text()
    for seen_text in ("<td>defenses</td><td>prune(ratio=0.5)</td>", "<td>strategy</td><td>fedavg</td>",
                      "<td>upload codec</td><td>none</td>", "ig(iterations=5) on the update threat", "PSNR (dB)"):
        assert seen_text in run_page, seen_text
    for unit in (r"uploaded, all clients</td><td>[0-9.]+ MB<", r"wall time</td><td>[0-9.]+ s<",
                 r"worst PSNR</td><td>[0-9.]+ dB", r"<figcaption>#[0-9]+: [0-9.]+ dB</figcaption>"):
        assert re.search(unit, run_page), unit
    assert "http://" not in run_page and "https://" not in run_page  # nothing fetched from a network
    assert "compared" in swept.ids
    frontiers = [i for i in swept.images if i["title"]]
    assert frontiers and all("S1: train.lr=0.05\nS2: train.lr=0.2" in i["title"] for i in frontiers)


def test_a_finished_run_stays_finished_when_a_setting_with_a_default_is_added_later(tmp_path):
    """Summaries written before a new scenario key existed still match (the stored scenario is
    validated again); a changed value does not."""
    from fedsim.scenario import parse_scenario
    from fedsim.compare.sweep import completed

    scenario = parse_scenario(small_raw())
    stored = scenario.model_dump(mode="json")
    del stored["train"]["momentum"]  # as an older fedsim, without that key, would have written it
    (tmp_path / "summary.json").write_text(json.dumps({"scenario": stored}))
    assert completed(tmp_path, scenario)
    stored["train"]["lr"] = 0.123
    (tmp_path / "summary.json").write_text(json.dumps({"scenario": stored}))
    assert not completed(tmp_path, scenario)
    (tmp_path / "summary.json").write_text("{not json")
    assert not completed(tmp_path, scenario)
