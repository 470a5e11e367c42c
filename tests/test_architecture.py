"""The package layout's rules (shared/DESIGN.md "Layout target"), read from the source with ``ast``:
nothing is imported or run.

- no import cycle among fedsim's modules (module-level and function-local imports alike);
- nothing imports ``fedsim.cli`` (the command line is a thin layer on top);
- the attacks import only fedsim's leaves (modules that import nothing else of fedsim; or, like
  ``fedsim.world.memory`` on ``fedsim.world.models``, nothing but leaves), and the packages above
  those run no fedsim import of their own when loaded;
- no fedsim module imports ``attacks.cli``;
- strategies/ and defenses/ never import fedsim's run, engines, audit or compare packages.

A package ``__init__`` that re-exports lazily (a module-level ``__getattr__`` reading an ``_EXPORTS``
dict of name -> submodule) imports nothing when loaded; ``from fedsim.world import World`` counts as
an import of the submodule ``_EXPORTS`` names (``fedsim.world.build``), so a cycle through a lazy
re-export is still found.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "attacks", "strategies", "defenses")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


SOURCES = _sources()


def _lazy_exports(name: str) -> dict[str, str]:
    """A package's ``_EXPORTS`` (name -> absolute module) when it re-exports lazily, else {}."""
    path, tree = SOURCES[name]
    if path.name != "__init__.py":
        return {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                # Evaluated literally: a dict display, possibly of dict comprehensions over name tuples.
                value = eval(compile(ast.Expression(node.value), str(path), "eval"), {})  # noqa: S307
                return {k: f"{name}.{v}" for k, v in value.items()}
    return {}


def _is_lazy_getattr(node: ast.AST, module: str) -> bool:
    return (isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            and SOURCES[module][0].name == "__init__.py")


def _imports(module: str, *, module_level_only: bool = False) -> set[str]:
    """The modules of PACKAGES that ``module`` imports (resolved: relative imports, ``from pkg import sub``,
    names a lazy package re-exports). Imports inside a package's lazy ``__getattr__`` are left out;
    ``module_level_only`` leaves out every import inside a function or class too."""
    path, tree = SOURCES[module]
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str, names: list[str] | None) -> None:
        if target.split(".")[0] not in PACKAGES:
            return
        if names is None:
            found.add(target)
            return
        lazy = _lazy_exports(target) if target in SOURCES else {}
        for n in names:
            if f"{target}.{n}" in SOURCES:
                found.add(f"{target}.{n}")  # a submodule
            elif n in lazy:
                found.add(lazy[n])
            else:
                found.add(target)

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_lazy_getattr(child, module):
                continue
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if module_level_only and nested:
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, None)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                add(target, [a.name for a in child.names if a.name != "*"] or None)
            visit(child, top and not nested)

    visit(tree, True)
    found.discard(module)
    return {m for m in found if m in SOURCES}


def _fedsim(names) -> set[str]:
    return {m for m in names if m == "fedsim" or m.startswith("fedsim.")}


GRAPH = {m: _fedsim(_imports(m)) for m in SOURCES if m == "fedsim" or m.startswith("fedsim.")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    """The parser sees what it should (guards the rules below against passing on an empty graph)."""
    assert "fedsim.run.apps" in GRAPH and "fedsim.world.build" in GRAPH["fedsim.run.apps"]
    assert "fedsim.scenario.schema" in GRAPH["fedsim.world.build"]
    assert "fedsim.world.models" in GRAPH["fedsim.world.memory"]  # a function-local import
    assert "fedsim.scenario.schema" in GRAPH["fedsim.compare.sweep"]  # through the lazy fedsim.scenario
    assert GRAPH["fedsim.world"] == set() and GRAPH["fedsim.scenario"] == set()  # lazy re-exports only


def test_no_import_cycle_among_fedsim_modules():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    importers = sorted(m for m in SOURCES if "fedsim.cli" in _imports(m) and m != "fedsim.__main__")
    assert importers == [], f"fedsim.cli is imported by {importers}"


def _leaf(module: str) -> bool:
    return not (GRAPH[module] - {module})


def _on_leaves(module: str) -> bool:
    """A leaf, or a module that imports leaves only."""
    return all(_leaf(m) for m in GRAPH[module])


def _loads_no_fedsim(package: str) -> bool:
    """Loading the package runs no import of another fedsim module (lazy re-exports aside)."""
    return not _fedsim(_imports(package, module_level_only=True))


def test_attacks_import_only_fedsim_leaves():
    used = {}
    for m in SOURCES:
        if m == "attacks" or m.startswith("attacks."):
            for target in _fedsim(_imports(m)):
                used.setdefault(target, []).append(m)
    assert used, "the attacks import nothing of fedsim: update this test"
    not_leaves = {t: sorted(by) for t, by in used.items() if not _on_leaves(t)}
    assert not not_leaves, f"the attacks import fedsim modules that are not leaves: {not_leaves}"
    heavy = sorted({".".join(t.split(".")[:i]) for t in used for i in range(1, t.count(".") + 1)
                    if not _loads_no_fedsim(".".join(t.split(".")[:i]))})
    assert not heavy, f"packages above the attacks' fedsim leaves import fedsim modules when loaded: {heavy}"


@pytest.mark.parametrize("leaf", ["fedsim.world.data", "fedsim.world.models", "fedsim.world.partition",
                                  "fedsim.scenario.strict_yaml", "fedsim.run.outdir", "fedsim.console"])
def test_leaves_stay_leaves(leaf):
    assert _leaf(leaf), f"{leaf} imports {sorted(GRAPH[leaf])}"


def test_memory_imports_only_the_models():
    assert GRAPH["fedsim.world.memory"] <= {"fedsim.world.models"}


def test_no_fedsim_module_imports_the_attack_cli():
    importers = sorted(m for m in GRAPH if "attacks.cli" in _imports(m))
    assert importers == [], f"attacks.cli is imported by {importers}"


def test_strategies_and_defenses_stay_below_the_run():
    banned = ("fedsim.run", "fedsim.engines", "fedsim.audit", "fedsim.compare", "fedsim.cli")
    bad = {m: sorted(t for t in _imports(m) if t.startswith(banned) or t in ("fedsim.apps",))
           for m in SOURCES if m.split(".")[0] in ("strategies", "defenses")}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"strategies/defenses import fedsim's run layers: {bad}"


def test_no_script_folder_shadows_a_package():
    """A script run as ``python benchmarks/X.py`` has its folder first on sys.path: a benchmarks/defenses.py
    made ``import defenses`` (which the scenario schema does) load the benchmark instead of the package."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    for folder in ("benchmarks", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            assert path.stem not in packages, f"{path.relative_to(ROOT)} shadows the {path.stem} package"
