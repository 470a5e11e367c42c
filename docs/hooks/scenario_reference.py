"""MkDocs hook: the "Scenario reference" page, generated at build time from the scenario's schema and the
registries (``fedsim.scenario.reference``), so it cannot drift from what ``fedsim validate`` accepts."""

from __future__ import annotations

from mkdocs.structure.files import File, Files

PAGE = "scenario-reference.md"


def on_files(files: Files, config) -> Files:
    from fedsim.scenario.reference import markdown

    files.append(File.generated(config, PAGE, content=markdown()))
    return files
