"""The run report as a person reads it (issue 25 item 3): figures with their units, the settings that were
run, and each audit's reconstructions as truth/reconstruction pairs (the best and the worst, bounded,
scaled up, their PSNR under them). The page in a browser: tests/test_sweep.py's headless-Chromium test."""

import base64
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from attacks.metrics import psnr as psnr_per_image
from attacks.pictures import PAIRS_KEPT, best_and_worst, save_grid, save_pairs, to_uint8
from fedsim.compare.readable import format_bytes, format_db, format_seconds, section_of, settings_rows
from fedsim.compare.report import PAIR_HEIGHT, write_report
from fedsim.scenario import parse_scenario
from tests.conftest import small_raw


def test_bytes_seconds_and_psnr_read_with_their_units():
    assert format_bytes(1993320) == "1.99 MB"  # the raw integer
    assert [format_bytes(n) for n in (0, 999, 12_345, 999_600, 2.5e9)] == ["0 B", "999 B", "12.3 kB", "1 MB", "2.5 GB"]
    assert format_seconds(11.62) == "11.6 s" and format_seconds(754) == "754 s (12.6 min)"
    assert format_seconds(9000) == "9000 s (2.5 h)"
    assert format_db(6.786) == "6.8 dB" and format_db(math.inf) == "exact" and format_db(None) == "-"


def test_best_and_worst_are_bounded_disjoint_and_best_then_worst_first():
    psnr = [10.0, 30.0, 5.0, 20.0, 25.0, 7.0, 15.0, 1.0, 12.0, math.inf, 3.0, 8.0]
    best, worst = best_and_worst(psnr, limit=7)
    assert best == [9, 1, 4, 3] and worst == [7, 10, 2]  # ceil(7/2) highest first, the rest lowest first
    best, worst = best_and_worst(psnr)
    assert len(best) + len(worst) == PAIRS_KEPT and not set(best) & set(worst)
    assert best_and_worst([4.0, 9.0, 4.0], limit=10) == ([1, 0, 2], [])  # few: all of them, best first, ties in order
    assert best_and_worst([2.0, math.nan, 1.0], limit=2) == ([0], [1])  # a NaN counts as the worst


def _batch(n=32, size=16, seed=0):
    """A true batch and a reconstruction of it, each image noisier than the one before."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, 1, size, size, generator=g)
    noise = torch.randn(n, 1, size, size, generator=g) * torch.linspace(0.01, 0.5, n).view(n, 1, 1, 1)
    return truth, (truth + noise).clamp(0, 1)


def _run_folder(path, audit_rows, scenario=None):
    path.mkdir(parents=True)
    (path / "audit").mkdir()
    rows = [{"round": r, "accuracy": 0.1 * r, "bytes_up": 996660, "bytes_down": 996660} for r in (1, 2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"name": "small", "accuracy": 0.2, "best_accuracy": 0.2, "rounds": 2, "bytes_up_total": 1993320,
               "bytes_down_total": 1993320, "failures_total": 0, "wall_s": 11.62, "audit_worst_psnr": 6.79,
               **({"scenario": scenario} if scenario else {})}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in audit_rows))
    return path


def _audit_row(**kw):
    return {"round": 2, "client": 3, "attack": "ig", "threat": "update", "images": 32, "psnr": 12.5, "ssim": 0.3,
            "label_accuracy": 1.0, "wall_s": 0.56, "reconstruction": "round-2-client-3.png", **kw}


def test_the_run_page_lays_out_the_best_and_worst_pairs_scaled_up_with_their_psnr(tmp_path):
    truth, recon = _batch()
    p = psnr_per_image(recon, truth)
    scenario = parse_scenario(small_raw(defense={"name": "prune", "ratio": 0.5},
                                        strategy={"name": "fedprox", "mu": 0.01},
                                        audit={"attack": "ig", "every": 2})).model_dump(mode="json")
    run = _run_folder(tmp_path / "run", [_audit_row(pairs="round-2-client-3.npz")], scenario)
    save_grid(run / "audit" / "round-2-client-3.png", truth, recon)
    save_pairs(run / "audit" / "round-2-client-3.npz", truth, recon, list(p))

    kept = np.load(run / "audit" / "round-2-client-3.npz")
    best, worst = best_and_worst(list(p))
    assert list(kept["index"]) == best + worst and int(kept["best"]) == len(best) and int(kept["images"]) == 32
    assert np.array_equal(kept["truth"], to_uint8(truth[kept["index"]])) and np.allclose(kept["psnr"], p[kept["index"]])

    page = write_report(run).read_text()
    assert "<h1>fedsim run: run</h1>" in page  # the folder, the scenario's name beside it
    for text in ("<td>strategy</td><td>fedprox(mu=0.01)</td>", "<td>defenses</td><td>prune(ratio=0.5)</td>",
                 "<td>uploaded, all clients</td><td>1.99 MB</td>", "<td>wall time</td><td>11.6 s</td>",
                 "<td>audit: worst PSNR</td><td>6.8 dB", "<th>PSNR (dB)</th>", "href='audit/round-2-client-3.png'"):
        assert text in page, text
    captions = re.findall(r"<figcaption>#(\d+): ([0-9.]+) dB</figcaption>", page)
    assert [int(i) for i, _ in captions] == best + worst  # best first, then worst, PAIRS_KEPT of 32
    assert [float(d) for _, d in captions] == [round(float(p[i]), 1) for i in best + worst]
    images = re.findall(r"<img class='(truth|reconstruction)' alt='[^']*' title='[^']*' src='data:image/png;base64,([^']+)'", page)
    assert [kind for kind, _ in images] == ["truth", "reconstruction"] * PAIRS_KEPT
    for _, data in images:  # 16 pixels scaled up by a whole factor, each pixel a block
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (PAIR_HEIGHT, PAIR_HEIGHT)


def test_an_older_run_without_pairs_shows_its_grid_at_its_own_size_and_a_torn_pairs_file_is_refused(tmp_path):
    from fedsim.cli import main

    truth, recon = _batch(n=4)
    old = _run_folder(tmp_path / "old", [_audit_row(images=4)])
    save_grid(old / "audit" / "round-2-client-3.png", truth, recon)
    page = write_report(old).read_text()
    assert "<div class='strip'><img class='grid'" in page and "class='reconstruction'" not in page
    assert "holds no scenario" in page

    torn = _run_folder(tmp_path / "torn", [_audit_row(pairs="round-2-client-3.npz")])
    (torn / "audit" / "round-2-client-3.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["report", str(torn)]) == 2
    assert not (torn / "report.html").exists() and not (torn / "report").exists()  # refused before drawing


def test_a_deployment_audit_without_truth_keeps_reconstructions_unscored(tmp_path):
    _, recon = _batch(n=3)
    run = _run_folder(tmp_path / "run", [_audit_row(psnr=None, images=3, pairs="round-2-client-3.npz")])
    save_pairs(run / "audit" / "round-2-client-3.npz", None, recon, None)
    page = write_report(run).read_text()
    assert page.count("class='reconstruction'") == 3 and "class='truth'" not in page and "not scored" in page


def test_the_settings_name_what_was_run_and_only_the_settings_that_apply():
    scenario = parse_scenario(small_raw(
        strategy={"name": "fedprox", "mu": 0.01}, upload={"codec": "topk", "ratio": 0.1},
        defense=[{"name": "clip", "max_norm": 1.0}, {"name": "prune", "ratio": 0.5}],
        data__partition={"name": "dirichlet", "alpha": 0.3}, data__image_size=16,
        audit={"attack": "ig", "every": 2, "clients": [3], "attack_config": {"iterations": 5}})).model_dump(mode="json")
    rows = dict(settings_rows(scenario))
    assert rows["data"] == "digits, images at 16 x 16 px; 4 clients, validation fraction 10 %"
    assert rows["partition"] == "dirichlet(alpha=0.3, min_partition_size=2)"  # not the shards' or classes' counts
    assert rows["strategy"] == "fedprox(mu=0.01)" and rows["upload codec"].startswith("topk(ratio=0.1")
    assert rows["defenses"] == "clip(max_norm=1.0), then prune(ratio=0.5)"
    assert rows["audit"].startswith("ig(iterations=5) on the update threat, every 2 rounds and the last, partitions 3")
    assert rows["training"].startswith("2 rounds, 1 local epoch, batch 32, lr 0.1")
    assert [section_of(k) for k in ("train.lr", "data.partition.alpha", "defense", "seed")] == \
        ["training", "partition", "defenses", "seed"]


@pytest.mark.parametrize("n", [3, 40])
def test_save_pairs_keeps_at_most_the_bound(tmp_path, n):
    truth, recon = _batch(n=n, size=8)
    save_pairs(tmp_path / "p.npz", truth, recon, list(psnr_per_image(recon, truth)))
    kept = np.load(tmp_path / "p.npz")
    assert len(kept["index"]) == min(n, PAIRS_KEPT) and kept["reconstruction"].shape[1:] == (8, 8, 1)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_run_on_the_virtual_clock_plots_accuracy_against_virtual_time(tmp_path):
    """A scenario with a system section: the report plots accuracy against the virtual time its rows carry."""
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics

    raw = small_raw(system={"step_s": 0.05, "latency_s": 0.01, "down_mbps": 10, "up_mbps": 1})
    run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert all(r["virtual_time_s"] > 0 for r in rows)
    page = write_report(tmp_path / "run").read_text()
    assert "accuracy time" in page and (tmp_path / "run" / "report" / "accuracy_time.png").is_file()
    with Image.open(tmp_path / "run" / "report" / "accuracy_time.png") as im:
        assert im.size[1] > 100  # a figure, drawn
