"""YAML for input files (scenarios, sweeps, ``--set`` values, attack configs): PyYAML's safe
loader, refusing two things it would otherwise accept without a word:

- a key given twice in one mapping: PyYAML keeps the last one, so a second ``rounds:`` written
  further down silently replaces the first (merge keys, ``<<: *base``, may still be overridden);
- a document whose aliases expand past ``MAX_NODES`` values or ``MAX_DEPTH`` levels (the
  "billion laughs": a 1 kB file of nested aliases is a list of 10^9 items to anything that
  walks it: validation, an error message echoing it, a JSON dump). The expanded size is
  counted on the composed node graph, where each alias is one shared node, so the check
  itself costs the size of the file, not of the expansion.

Errors are ``yaml.YAMLError`` (``MarkedYAMLError`` with the line), so callers that report
"not valid YAML at line N" keep working. Leaf module.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

# A scenario is ~100 values and 6 levels deep; these leave room for long lists (audit.clients,
# a sweep's grid) while keeping every recursive walker (pydantic, repr, json) far from trouble.
MAX_NODES = 100_000
MAX_DEPTH = 50


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: Node) -> None:
    """Count the values (and levels) ``root`` expands to, each shared node counted once per use.

    An iterative post-order walk with memoised sizes: a node reached again while its own
    subtree is still open is a recursive alias (``&a [*a]``), which expands forever."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        key = id(node)
        if closing:
            open_nodes.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            if size[key] > MAX_NODES:
                raise ConstructorError(None, None, f"aliases expand to more than {MAX_NODES} values", node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise ConstructorError(None, None, f"nested more than {MAX_DEPTH} levels deep", node.start_mark)
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ConstructorError(None, None, "an alias refers to the node that contains it", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and alias bombs (module docstring)."""

    def construct_document(self, node: Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in from an alias may be overridden: that is what << is for
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {str(key)[:80]!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """Parse one YAML document with :class:`StrictLoader`; raises ``yaml.YAMLError``.

    A document nested deeper than Python's recursion limit (PyYAML composes recursively)
    is reported as a YAMLError too, not a RecursionError."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep") from None


def describe(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and, where known, the line."""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["not valid YAML"])[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {problem[:200]}"
