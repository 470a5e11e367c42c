"""The documentation site and the commands it and the README show (issue 25 item 2).

- The site builds with ``mkdocs build --strict`` (broken links, missing anchors, mkdocstrings references
  that do not resolve fail it); skipped only where mkdocs is not installed (``pip install -e '.[docs]'``;
  ``make test-all`` installs it).
- The scenario reference the site generates (``fedsim.scenario.reference``) lists every key of the schema
  and of each registry's settings.
- The worked example of each seam on docs/extending.md is real code: each is loaded and registered, and
  the strategy, codec and defense examples train together for two rounds.
- Every shell command in a code block of README.md and docs/getting-started.md is checked: a scenario
  command is validated in process with the same ``--set`` overrides, a sweep file expanded and validated,
  the attack CLI's flags parsed, a make target found in the Makefile; commands that need a run, a server
  or a cluster (report, resume, deploy) are named with the test that runs them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import small_raw

ROOT = Path(__file__).resolve().parents[1]
COMMAND_PAGES = ("README.md", "docs/getting-started.md", "docs/resuming.md")
# Commands that need a finished run, a SuperLink or a cluster: the tests that run each.
COVERED_BY = {
    "report": ("tests/test_sweep.py", "report"),
    "resume": ("tests/test_resume.py", "resume"),
    "deploy": ("tests/test_deployment_secure.py", "deploy"),
}


# ----------------------------------------------------------------------------- the site

def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs is not installed (pip install -c constraints.txt -e '.[docs]')")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # mkdocs-material's banner
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (site / "scenario-reference" / "index.html").read_text()
    assert "data.partition.alpha" in reference and "upload.ratio" in reference
    assert (site / "experiments" / "defenses" / "RESULTS" / "index.html").is_file()
    assert (site / "experiments" / "defenses" / "out" / "prune_noise_privacy_utility.png").is_file()
    assert "StrategySpec" in (site / "seams" / "index.html").read_text()


def test_scenario_reference_lists_every_key():
    from defenses import DEFENSES
    from fedsim.scenario.reference import defaults_yaml, markdown
    from fedsim.scenario.schema import Scenario, parse_scenario
    from strategies import get_strategy, strategy_names
    from strategies.compression import codec_class, codec_names

    import yaml

    page = markdown()
    defaults = yaml.safe_load(defaults_yaml())
    parse_scenario(defaults)  # the page's "every key at its default" is a valid scenario

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    top = {"upload", "defense", "audit", "privacy", "strategy"}  # sections whose keys come from elsewhere
    for key in leaves({k: v for k, v in defaults.items() if k not in top}):
        assert f"`{key}`" in page, key
    assert "| `data.partition.alpha` | float | `0.5` | > 0 |" in page
    for name in strategy_names():
        assert f"### `{name}`" in page
        for field in get_strategy(name).params.model_fields:
            assert f"`strategy.{field}`" in page, (name, field)
    for name in codec_names():
        for field in codec_class(name).Params.model_fields:
            assert f"`upload.{field}`" in page, (name, field)
    for name, cls in DEFENSES.items():
        assert f"### `{name}`" in page
        assert all(f"`defense.{f}`" in page for f in cls.Params.model_fields if f != "name")
    audit = Scenario.model_fields["audit"].annotation.__args__[1]
    assert all(f"`audit.{f}`" in page for f in audit.model_fields)


# ----------------------------------------------------------------------------- docs/extending.md

def _examples() -> dict[str, str]:
    """docs/extending.md's Python blocks by the file each names on its first line (``# strategies/x.py``)."""
    text = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


def _load(path: str, source: str, monkeypatch) -> types.ModuleType:
    name = path.removesuffix(".py").replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def test_extending_examples_train_together(monkeypatch, tmp_path, one_torch_thread):
    import strategies.compression as compression
    import strategies.registry
    from defenses.registry import DEFENSES
    from fedsim.engines import run_scenario
    from fedsim.run.results import read_metrics
    from fedsim.scenario import parse_scenario

    examples = _examples()
    assert set(examples) == {"strategies/fedl2.py", "strategies/compression/half.py", "defenses/round.py",
                             "attacks/random_guess.py", "fedsim/trackers/log.py"}
    strategy = _load("strategies/fedl2.py", examples["strategies/fedl2.py"], monkeypatch)
    codec = _load("strategies/compression/half.py", examples["strategies/compression/half.py"], monkeypatch)
    defense = _load("defenses/round.py", examples["defenses/round.py"], monkeypatch)
    # the registry lines the page names, made in memory
    monkeypatch.setitem(strategies.registry._EXTRA, "fedl2", strategy.SPEC)
    monkeypatch.setitem(compression._CODECS, "half", codec.HalfCodec)
    monkeypatch.setitem(DEFENSES, "round", defense.RoundDefense)

    raw = small_raw(strategy={"name": "fedl2", "lam": 0.01}, upload={"codec": "half"},
                    defense={"name": "round", "grid": 1e-3})
    with pytest.raises(ValueError, match="strategy.lam"):
        parse_scenario({**raw, "strategy": {"name": "fedl2", "lam": -1}})
    summary = run_scenario(parse_scenario(raw), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2] and summary["accuracy"] > 0.3
    assert rows[0]["codec"] == "half"
    assert rows[0]["bytes_up"] < 0.6 * rows[0]["bytes_down"]  # float16 up, the same model dense (fp32) down


def test_extending_attack_and_tracker_examples(monkeypatch, tmp_path, caplog):
    import torch

    import attacks.base
    from attacks import Observation
    from fedsim.run.rounds import RoundRecord
    from fedsim.scenario import parse_scenario

    examples = _examples()
    monkeypatch.setattr(attacks.base, "ATTACKS", dict(attacks.base.ATTACKS))  # @register adds to a copy
    attack = _load("attacks/random_guess.py", examples["attacks/random_guess.py"], monkeypatch)
    assert attacks.base.ATTACKS["random"] is attack.RandomGuess
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    grads = [torch.zeros_like(p) for p in model.parameters()]
    obs = Observation.from_gradients(model, grads, input_shape=(1, 4, 4), num_classes=3, batch_size=2)
    rec = attacks.base.build_attack("random", seed=0)._run(obs, torch.Generator().manual_seed(0))
    assert rec.images.shape == (2, 1, 4, 4) and 0 <= float(rec.images.min()) <= float(rec.images.max()) <= 1

    tracker = _load("fedsim/trackers/log.py", examples["fedsim/trackers/log.py"], monkeypatch)
    log = tracker.LogTracker(parse_scenario(small_raw()), tmp_path, lambda: [], {})
    record = RoundRecord(server_round=1, arrays_sent=None, nodes=[], arrays=None, train_metrics={}, bytes_up=10,
                         bytes_down=10, started=0.0, row={"round": 1, "accuracy": 0.5, "loss": 1.25, "bytes_up": 10})
    with caplog.at_level(logging.INFO, logger="fedsim"):
        log.on_round(record)
        log.finish({"accuracy": 0.5})
    assert "small round 1: accuracy 0.5000, loss 1.2500, 10 bytes up" in caplog.text
    assert "small done: final accuracy 0.5000" in caplog.text


# ----------------------------------------------------------------------------- the commands shown

def shown_commands(page: str) -> list[str]:
    """Every shell command in ``page``'s code blocks (indented or fenced, YAML blocks aside), comments cut,
    synopsis lines (``SCENARIO.yaml [--set ...]``) left out."""
    text = (ROOT / page).read_text()
    lines = [m.group(1) for m in re.finditer(r"^(?:    |\t)(\S.*)$", text, flags=re.M)]
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang in ("", "bash", "sh", "console"):
            lines.extend(block.splitlines())
    commands = []
    for line in lines:
        line = line.split(" #")[0].strip()
        if not line.startswith(("python -m fedsim", "python -m attacks", "make ")):
            continue
        if "[" in line or re.search(r"\b[A-Z][A-Z_]+(\.yaml)?\b", line.split(" --")[0].removeprefix("python -m ")):
            continue  # a synopsis, not a command
        commands.append(line)
    return commands


def _check_command(command: str) -> None:
    words = shlex.split(command)
    if words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), f"no make target {words[1]}"
        return
    if words[:3] == ["python", "-m", "attacks"]:
        from attacks.cli import build_parser

        build_parser().parse_args(words[3:])
        return
    args = words[3:]
    from fedsim.cli import _parser, main

    if args[0] in COVERED_BY:
        test_file, entry = COVERED_BY[args[0]]
        assert entry in (ROOT / test_file).read_text(), f"{test_file} does not run `fedsim {args[0]}`"
        if args[0] == "deploy":
            assert main(["validate", args[1]]) == 0
        return
    if args[0] == "sweep":
        from fedsim.compare.sweep import load_sweep

        load_sweep(ROOT / args[1])  # every expanded scenario validated
        return
    if args[0] == "validate":
        assert main(args) == 0, command
        return
    parsed = _parser(validate=False).parse_args(args)  # --out, --overwrite, --quiet exist
    checked = ["validate", parsed.scenario, *(f"--set={s}" for s in parsed.overrides)]
    assert main(checked) == 0, command


@pytest.mark.parametrize("page", COMMAND_PAGES)
def test_commands_shown_are_valid(page, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = shown_commands(page)
    assert commands, f"no command found in {page}"
    for command in commands:
        _check_command(command)


def test_scenario_page_example_is_a_valid_scenario():
    """docs/scenario.md's annotated file: every key it shows still exists, with a value the schema takes."""
    import yaml

    from fedsim.scenario import parse_scenario

    text = (ROOT / "docs" / "scenario.md").read_text()
    (block,) = re.findall(r"## The scenario file\n.*?```yaml\n(.*?)```", text, flags=re.S)
    parse_scenario(yaml.safe_load(block))


def _github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (what mkdocs.yml's toc slugify reproduces in the site)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_into_the_docs_resolve():
    """Each link of the README to a file exists, and its #anchor is a heading of that file."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|benchmarks|experiments)/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert links
    for path, anchor in links:
        target = ROOT / path
        assert target.is_file(), path
        if anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
            assert anchor in {_github_slug(h) for h in headings}, f"{path}#{anchor}"
