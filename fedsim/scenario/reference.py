"""The scenario file's reference, rendered from the schema itself (a Markdown page).

Every key of ``Scenario`` and its sections, with its type, default, bounds and description, then the
settings of every registered strategy, upload codec, defense and attack, each read from its own
settings model (an attack's from its constructor's signature). The docs site builds its "Scenario
reference" page from ``markdown()`` (docs/hooks/scenario_reference.py), so the page cannot drift from
what ``python -m fedsim validate`` accepts.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import Scenario

HEADER = ("| key | type | default | allowed | description |", "|---|---|---|---|---|")


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (``X``, ``Literal["none"] | X``), or None."""
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def type_text(annotation: Any) -> str:
    """A field's type in words: ``int``, ``list of int``, ``null or int``, one of the literal values."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    args = _union_args(annotation)
    if len(args) > 1:
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"list of {type_text(item)}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
          (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def bounds_text(metadata: list[Any]) -> str:
    """pydantic's ``Field(gt=..., le=...)`` constraints as ``> 0, <= 1``."""
    out = []
    for item in metadata:
        for kind, attr, sign in BOUNDS:
            if isinstance(item, kind):
                bound = getattr(item, attr)
                out.append(f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}")
    return ", ".join(out)


def value_text(value: Any) -> str:
    """A default as it would be written in the YAML file."""
    if value is PydanticUndefined or value is inspect.Parameter.empty:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, str):
        return f"`{value}`"
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """One table row per key of ``model`` (nested sections flattened into dotted keys)."""
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        nested = _model_in(field.annotation)
        if nested is not None and not _union_args(field.annotation)[1:]:
            rows.extend(_rows(nested, f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(f"| `{key}` | {_cell(type_text(field.annotation))} | {_cell(value_text(default))} | "
                    f"{_cell(bounds_text(field.metadata))} | {_cell(field.description or '')} |")
    return rows


def table(model: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()) -> str:
    rows = _rows(model, prefix, skip)
    return "\n".join([*HEADER, *rows]) if rows else "No settings."


def _summary(obj: Any) -> str:
    """The first paragraph of an object's own docstring (not one it inherits), or of its module's."""
    doc = obj.__doc__ or getattr(sys.modules.get(getattr(obj, "__module__", "")), "__doc__", None) or ""
    doc = inspect.cleandoc(doc)
    return " ".join(doc.split("\n\n")[0].split())


def _strategies() -> str:
    from strategies import get_strategy, strategy_names
    from strategies.flower import FLOWER_CLASSES

    parts = []
    for name in strategy_names():
        spec = get_strategy(name)
        # one of Flower's classes: its own docstring; fedsim's: the docstring of its client algorithm's module
        where = FLOWER_CLASSES[name] if name in FLOWER_CLASSES else sys.modules[spec.client.__module__]
        parts.append(f"### `{name}`\n\n{_summary(where)}\n\n{table(spec.params, 'strategy.')}")
    return "\n\n".join(parts)


def _codecs() -> str:
    from strategies.compression import codec_class, codec_names

    parts = []
    for name in codec_names():
        if name == "none":
            continue
        cls = codec_class(name)
        parts.append(f"### `{name}`\n\n{_summary(sys.modules[cls.__module__])}\n\n{table(cls.Params, 'upload.')}")
    return "\n\n".join(parts)


def _defenses() -> str:
    from defenses import DEFENSES, defense_names

    parts = []
    for name in defense_names():
        cls = DEFENSES[name]
        parts.append(f"### `{name}`\n\n{_summary(sys.modules[cls.__module__])}\n\n"
                     f"{table(cls.Params, 'defense.', skip=('name',))}")
    return "\n\n".join(parts)


def _attacks() -> str:
    """Each attack's ``audit.attack_config`` keys: its constructor's keyword arguments (the audit sets
    ``seed`` from ``audit.seed``)."""
    from attacks import ATTACKS

    parts = []
    for name in sorted(ATTACKS):
        cls = ATTACKS[name]
        hints = typing.get_type_hints(cls.__init__)
        rows = [f"| `audit.attack_config.{p.name}` | {_cell(type_text(hints.get(p.name, p.annotation)))} | "
                f"{_cell(value_text(p.default))} |  |  |"
                for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in ("seed", "callback")]
        threats = ", ".join(f"`{t}`" for t in cls.threats)
        parts.append(f"### `{name}`\n\n{_summary(cls)} Threats: {threats}.\n\n"
                     + ("\n".join([*HEADER, *rows]) if rows else "No settings."))
    return "\n\n".join(parts)


def defaults_yaml() -> str:
    """Every key at its default, as a scenario file (``python -m fedsim validate`` accepts it)."""
    return Scenario().to_yaml()


# What a section's table does not say: its shape and where its prose lives. A section missing here (a new
# one) still gets its table, from its model.
INTROS = {
    "data": "What each client holds; data sets and partitions: [Running scenarios](scenario.md#the-scenario-file).",
    "strategy": "`strategy.name` plus that strategy's settings beside it (e.g. `strategy: {name: fedprox, mu: 0.1}`); "
                "papers and fidelity options: [Strategies](strategies.md).",
    "upload": "`none`, or `codec:` one of the codecs below with its settings beside it "
              "(`upload: {codec: NAME, ratio: 0.01}`); what each sends and what the audit sees through it: "
              "[Upload codecs](codecs.md).",
    "defense": "`none`, one block `{name: NAME, ...its settings}`, or a list of blocks applied in order "
               "(`defense: [{name: A, ...}, {name: B, ...}]`); what each protects against: [Defenses](defenses.md).",
    "audit": "`none`, or the per-round privacy audit ([Privacy audit](privacy.md#privacy-audit)).",
    "privacy": "`none`, or the empirical privacy estimate by canaries "
               "([Empirical privacy](privacy.md#empirical-privacy-canaries)).",
    "engine": "Where the clients run ([Engines](engines.md)).",
    "output": "Where results go ([Outputs](outputs.md)); checkpoints: [Resuming a run](resuming.md).",
}
# Sections whose keys come from a registry, each entry from its own settings model.
REGISTRIES = {"strategy": _strategies, "upload": _codecs, "defense": _defenses}


def _top_row(name: str, field: Any) -> str:
    return (f"| `{name}` | {_cell(type_text(field.annotation))} | "
            f"{_cell(value_text(field.get_default(call_default_factory=True)))} | "
            f"{_cell(bounds_text(field.metadata))} | {_cell(field.description or '')} |")


def _section(name: str, field: Any) -> str:
    intro = INTROS.get(name, field.description or "")
    if name in REGISTRIES:
        body = REGISTRIES[name]()
    else:
        body = table(_model_in(field.annotation), f"{name}.")
    if name == "audit":
        body += ("\n\n`audit.attack: auto` picks an attack for each audit; naming one takes its settings in "
                 "`audit.attack_config`:\n\n" + _attacks())
    return f"## `{name}`\n\n{intro}\n\n{body}\n" if intro else f"## `{name}`\n\n{body}\n"


def markdown() -> str:
    """The reference page: every section of ``Scenario`` in the schema's order."""
    fields = Scenario.model_fields
    plain = {n: f for n, f in fields.items() if n not in REGISTRIES and _model_in(f.annotation) is None}
    return "\n".join([
        "# Scenario reference",
        "",
        "Generated when the site is built, from the scenario's schema (`fedsim/scenario/schema.py`) and the "
        "strategy, codec, defense and attack registries (`fedsim/scenario/reference.py`), so it lists exactly "
        "the keys `python -m fedsim validate` accepts. Any key can be set from the command line with "
        "`--set key.path=value`; how a scenario is run and checked: [Running scenarios](scenario.md).",
        "",
        "Every key at its default, as a scenario file:",
        "",
        "```yaml",
        defaults_yaml().rstrip(),
        "```",
        "",
        "## Top level",
        "",
        *HEADER,
        *(_top_row(n, f) for n, f in plain.items()),
        "",
        *(_section(n, f) for n, f in fields.items() if n not in plain),
    ])


if __name__ == "__main__":
    print(markdown())
