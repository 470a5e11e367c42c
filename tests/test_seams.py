"""The seam holds: the core names no codec and no defense (issue 20).

fedsim's modules and the generic defense code iterate over the transforms a scenario lists;
each feature's own module (and the registries) are the only places its name appears. Docstrings
and comments may name features; string literals in code may not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODECS = ("topk", "dgc", "sign", "terngrad", "ef21", "sketch", "countsketch", "econtrol")
DEFENSES = ("dp_sgd", "dp_user", "clip", "prune", "noise")
GENERIC_DEFENSE_CODE = ("defenses/__init__.py", "defenses/base.py", "defenses/client.py")


def core_modules() -> list[Path]:
    return sorted(ROOT.glob("fedsim/**/*.py")) + [ROOT / p for p in GENERIC_DEFENSE_CODE]


def code_strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal in ``path`` that is not a docstring, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def feature_names_in(text: str) -> list[str]:
    return [name for name in (*CODECS, *DEFENSES) if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]


def test_the_core_names_no_codec_and_no_defense():
    found = [f"{path.relative_to(ROOT)}:{line}: {feature_names_in(text)} in {text[:60]!r}"
             for path in core_modules() for line, text in code_strings(path) if feature_names_in(text)]
    assert not found, "feature names in the core:\n" + "\n".join(found)


@pytest.mark.parametrize("text, names", [("dp_sgd", ["dp_sgd"]), ("use topk here", ["topk"]),
                                         ("update_clip_fraction", []), ("sketch_space", []),
                                         ("defense-update-clipped", [])])
def test_the_scan_finds_names_as_words(text, names):
    assert feature_names_in(text) == names


def test_a_codec_is_one_module_plus_one_registry_line():
    """Every registered codec and defense lives in a module of its own, which the core never imports."""
    from defenses import DEFENSES as registered_defenses
    from strategies.compression import _CODECS

    modules = {cls.__module__ for cls in _CODECS.values()} | {cls.__module__ for cls in registered_defenses.values()}
    for path in core_modules():
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & modules - {"strategies.compression.codec"}, f"{path} imports {imported & modules}"


def test_every_codec_says_what_the_attacker_sees():
    """A codec states its own audit view (no codec falls back to a generic note without saying so)."""
    from strategies.compression import _CODECS
    from strategies.compression.codec import Codec

    silent = [name for name, cls in _CODECS.items() if cls.audit_view is Codec.audit_view]
    assert not silent, f"codecs without an audit_view of their own: {silent}"


def test_the_audit_reads_each_codec_through_its_own_view():
    """The audit's note for a codec is the codec's own view of the reply, whatever the codec."""
    from strategies.compression import get_codec
    from strategies.compression.codec import AuditRequest, CodecContext

    request = AuditRequest(wire=None, sent={}, ctx=CodecContext(), param_names=[], support_fraction=0.25)
    assert get_codec("topk").audit_view(request).note.startswith("topk: only the 25%")
    assert get_codec("none").audit_view(request).note == ""
    assert not get_codec("countsketch").audit_view(request).exact
