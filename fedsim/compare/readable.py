"""A run's figures and settings as a person reads them: bytes in kB/MB/GB, seconds, PSNR in dB,
and the resolved scenario (summary.json's ``scenario``) as one line per section (data, partition,
model, training, strategy, upload codec, defenses, audit, privacy, engine) that names what was run
and only the settings that apply to it (a Dirichlet partition's alpha, not the shards' count)."""

from __future__ import annotations

import math
from typing import Any


def format_bytes(n: float | None) -> str:
    """Decimal units, three significant figures: 1993320 -> '1.99 MB'."""
    if n is None:
        return "-"
    value, units = float(n), ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(value) >= 999.5 and i < len(units) - 1:  # what would round to 1000 is one unit up
        value /= 1000
        i += 1
    return f"{value:.0f} B" if i == 0 or abs(value) >= 999.5 else f"{value:.3g} {units[i]}"


def format_seconds(s: float | None) -> str:
    """'11.6 s'; a long run also in minutes or hours: '754 s (12.6 min)'."""
    if s is None:
        return "-"
    text = f"{s:.3g} s" if s < 1000 else f"{s:.0f} s"
    if s >= 7200:
        return f"{text} ({s / 3600:.1f} h)"
    if s >= 120:
        return f"{text} ({s / 60:.1f} min)"
    return text


def format_db(psnr: float | None) -> str:
    """'6.8 dB'; an exactly reproduced image (infinite PSNR): 'exact'."""
    if psnr is None or (isinstance(psnr, float) and math.isnan(psnr)):
        return "-"
    return "exact" if math.isinf(psnr) and psnr > 0 else f"{psnr:.1f} dB"


def format_fraction(v: float | None) -> str:
    """A fraction (an accuracy) as a percentage: 0.1671 -> '16.7 %'."""
    return "-" if v is None else f"{100 * v:.3g} %"


def compact(value: Any) -> str:
    """A settings block as ``name(key=value, ...)`` (a codec's ``codec`` key names it as ``name`` does)."""
    if isinstance(value, dict):
        head = next((k for k in ("name", "codec") if k in value), None)
        inner = ", ".join(f"{k}={compact(v)}" for k, v in value.items() if k != head)
        if head is None:
            return f"({inner})"
        return f"{value[head]}({inner})" if inner else str(value[head])
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return str(value)


def _section(scenario: dict[str, Any], key: str) -> dict[str, Any]:
    value = scenario.get(key)
    return value if isinstance(value, dict) else {}


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


_PARTITION_PARAMS = {"dirichlet": ("alpha", "min_partition_size"), "inner_dirichlet": ("alpha",),
                     "pathological": ("classes_per_client",), "shards": ("shards_per_client",)}


def settings_rows(scenario: dict[str, Any]) -> list[tuple[str, str]]:
    """(section, what was run) for each section of a resolved scenario; a section the scenario lacks
    (an older fedsim's summary) is left out, one it does not know is shown as stored."""
    rows: list[tuple[str, str]] = []
    data, model, train = _section(scenario, "data"), _section(scenario, "model"), _section(scenario, "train")
    if data:
        size = data.get("image_size")
        text = f"{data.get('dataset')}" + (f", images at {size} x {size} px" if size else "")
        if data.get("dataset") == "synthetic":
            text += f", {compact(data.get('synthetic'))}"
        text += f"; {_plural(data.get('num_clients'), 'client')}, validation fraction " \
                f"{format_fraction(data.get('val_fraction'))}"
        rows.append(("data", text))
        part = data.get("partition") if isinstance(data.get("partition"), dict) else {}
        if part:
            params = _PARTITION_PARAMS.get(part.get("name"), ())
            rows.append(("partition", compact({"name": part.get("name"), **{k: part[k] for k in params if k in part}})))
    if model:
        name = model.get("name")
        extra = {"hidden": model.get("hidden")} if name == "mlp" else {}
        if model.get("dropout"):
            extra.update(dropout=model["dropout"], dropout_at=model.get("dropout_at"))
        if model.get("init") not in (None, "default"):
            extra["init"] = model["init"]
        rows.append(("model", compact({"name": name, **extra})))
    if train:
        parts = [_plural(train.get("rounds"), "round"), _plural(train.get("local_epochs"), "local epoch"),
                 f"batch {train.get('batch_size')}", f"lr {train.get('lr')}"]
        if train.get("lr_decay") not in (None, 1, 1.0):
            parts.append(f"lr decay {train['lr_decay']} per round")
        for key, label in (("momentum", "momentum"), ("weight_decay", "weight decay")):
            if train.get(key):
                parts.append(f"{label} {train[key]}")
        if "participation" in train:
            parts.append(f"{format_fraction(train['participation'])} of clients per round"
                         + (f" ({train['sampling']} sampling)" if train.get("sampling") not in (None, "fixed") else ""))
        rows.append(("training", ", ".join(parts)))
    if "strategy" in scenario:
        rows.append(("strategy", compact(scenario["strategy"])))
    if "upload" in scenario:
        rows.append(("upload codec", compact(scenario["upload"])))
    if "defense" in scenario:
        defense = scenario["defense"]
        defenses = defense if isinstance(defense, list) else [defense]
        rows.append(("defenses", ", then ".join(compact(d) for d in defenses) or "none"))  # in the order applied
    if "audit" in scenario:
        rows.append(("audit", _audit_text(scenario["audit"])))
    if "privacy" in scenario:
        rows.append(("privacy", compact(scenario["privacy"])))
    engine = _section(scenario, "engine")
    if engine:
        device = engine.get("device")
        rows.append(("engine", engine.get("name", "-") + (f" on {device}" if device not in (None, "auto") else "")))
    if "seed" in scenario:
        rows.append(("seed", str(scenario["seed"])))
    known = {"name", "seed", "data", "model", "strategy", "train", "upload", "defense", "audit", "privacy", "engine",
             "output"}
    rows += [(key, compact(value)) for key, value in scenario.items() if key not in known]
    return rows


_SECTIONS = {"data": "data", "model": "model", "train": "training", "strategy": "strategy", "upload": "upload codec",
             "defense": "defenses", "audit": "audit", "privacy": "privacy", "engine": "engine", "seed": "seed"}


def section_of(key: str) -> str:
    """The ``settings_rows`` section a scenario key (as a sweep names it: ``data.partition.alpha``) is in."""
    if key.startswith("data.partition"):
        return "partition"
    head = key.split(".", 1)[0]
    return _SECTIONS.get(head, head)


def _audit_text(audit: Any) -> str:
    if not isinstance(audit, dict):
        return compact(audit)
    attack = compact({"name": audit.get("attack"), **(audit.get("attack_config") or {})})
    every = audit.get("every", 1)
    clients = audit.get("clients")
    who = f"partitions {', '.join(map(str, clients))}" if isinstance(clients, list) else _plural(clients, "client")
    text = (f"{attack} on the {audit.get('threat')} threat, "
            f"{'every round' if every == 1 else f'every {every} rounds and the last'}, {who} per audited round")
    if audit.get("threat") == "gradient" and audit.get("batch_size"):
        text += f", query batch {audit['batch_size']}"
    if audit.get("membership") not in (None, "none"):
        text += f", membership inference ({audit['membership']})"
    return text + f", attack seed {audit.get('seed', 0)}"
