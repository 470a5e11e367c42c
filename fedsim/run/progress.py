"""A rich progress bar over rounds (on stderr, so stdout keeps only the result table)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RoundProgress:
    def __init__(self, rounds: int, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self._progress = Progress(TextColumn("[bold]round"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=False, disable=not enabled)
        self._task = self._progress.add_task("", total=rounds, completed=completed)  # resumed: rounds done

    def __enter__(self) -> "RoundProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def advance(self, row: dict[str, Any]) -> None:
        desc = f"acc {row['accuracy']:.4f}  loss {row['loss']:.4f}"
        if row.get("failures"):
            desc += f"  failures {row['failures']}"
        self._progress.update(self._task, advance=1, description=desc)
