"""MkDocs hook: repository files outside docs/ that the site shows, at their repository paths.

The measured results live beside the scripts that make them (``benchmarks/RESULTS.md``,
``experiments/*/RESULTS*.md``); they become pages of the site without a copy in docs/. The docs pages
link to them as files in the repository do (``../experiments/defenses/RESULTS.md``), so the same links
work on GitHub and in the site: this hook rewrites a link that leaves docs/ to the site path of its
target (docs/X is X in the site, any other repository file R is R), and brings in the images such a
link shows. A link to a repository file the site does not hold is left as written, so
``mkdocs build --strict`` reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

RESULT_PAGES = ("benchmarks/RESULTS*.md", "experiments/*/RESULTS*.md")
ASSETS = (".png", ".jpg", ".jpeg", ".svg", ".gif")  # linked images the site copies in
# A Markdown link or image target: ](target) or ](target "title"), anchors and titles kept apart.
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")

_repo: Path | None = None


def _repo_path(file: File, config) -> str:
    """A file's path in the repository: docs/X for docs/'s own files (and pages generated there), R for
    the repository files this hook adds."""
    outside = file.abs_src_path is not None and not Path(file.abs_src_path).resolve().is_relative_to(
        Path(config.docs_dir).resolve())
    return file.src_uri if outside else f"docs/{file.src_uri}"


def _site_path(repo_path: str) -> str:
    return repo_path.removeprefix("docs/")


def _target(page_repo_path: str, link: str) -> str | None:
    """The repository path a relative link of the page points at, or None for URLs and absolute paths."""
    if "://" in link or link.startswith(("/", "mailto:")):
        return None
    return posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), link))


def on_config(config):
    global _repo
    _repo = Path(config.config_file_path).resolve().parent
    return config


def on_files(files: Files, config) -> Files:
    added = []
    for pattern in RESULT_PAGES:
        for path in sorted(_repo.glob(pattern)):
            added.append(File.generated(config, path.relative_to(_repo).as_posix(), abs_src_path=str(path)))
    for file in added:
        files.append(file)
    # the images the pages link to from outside docs/ (the results' plots, a frontier in the docs)
    for file in [f for f in files if f.is_documentation_page()]:
        page_repo = _repo_path(file, config)
        for match in LINK.finditer(file.content_string):
            target = _target(page_repo, match.group(2))
            if target is None or not target.lower().endswith(ASSETS) or target.startswith("docs/"):
                continue
            if files.get_file_from_path(target) is None and (_repo / target).is_file():
                files.append(File.generated(config, target, abs_src_path=str(_repo / target)))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    page_repo = _repo_path(page.file, config)
    page_site_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = _target(page_repo, match.group(2))
        if target is None or files.get_file_from_path(_site_path(target)) is None:
            return match.group(0)
        link = posixpath.relpath(_site_path(target), page_site_dir or ".")
        return f"{match.group(1)}{link}{match.group(3) or ''}{match.group(4)}"

    return LINK.sub(rewrite, markdown)
