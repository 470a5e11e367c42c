"""Run outputs: metrics.jsonl (a line per round), summary.json, the resolved scenario, curves.

Every file is written atomically (temporary file in the same folder, then rename), except
metrics.jsonl, which gets one line appended per round (one write call; rewriting the whole
file cost 37 ms a round at round 10,000). An interrupted run keeps every round it reported;
a kill in the middle of an append can leave a torn last line, which ``read_metrics``
recognises (no newline, or not JSON) and leaves out.

A full disk (ENOSPC, or the quota: EDQUOT) on any of these writes is ``DiskFullError`` naming the
file; the write leaves the file as it was (the atomic writes keep the old file, a failed append
is cut back to the rows before it), so the run folder stays consistent and ``fedsim resume``
continues it once there is space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; results should read like any other file


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(Exception):
    """A write found the device full (ENOSPC) or the user's quota used up (EDQUOT). The file written
    is as it was before the write; ``str()`` is one line naming it. Picklable (a sweep's Ray task)."""

    def __init__(self, path: str | Path, quota: bool = False):
        super().__init__(str(path), quota)
        self.path, self.quota = str(path), quota

    def __str__(self) -> str:
        return f"{'the disk quota is used up' if self.quota else 'no space left on the device'} writing {self.path}"


@contextlib.contextmanager
def disk_full_as_error(path: str | Path) -> Iterator[None]:
    """Turn an OSError of a full disk or quota raised inside into DiskFullError naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(path, quota=exc.errno == errno.EDQUOT) from None


def atomic_write(path: Path, text: str) -> None:
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            # rename is atomic: a killed or interrupted run leaves the old or the new file, never
            # half of one. No fsync: it guards only against power loss and costs ~8 ms a round.
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class ResultsWriter:
    """Owns one run directory."""

    def __init__(self, out_dir: str | Path, scenario_yaml: str, rows: list[dict[str, Any]] | None = None):
        """``rows``: a resumed run's rounds so far (``fedsim.run.checkpoint.kept_rows``); metrics.jsonl is
        rewritten to them, once, and appended to from there."""
        self.dir = Path(out_dir)
        self.rows: list[dict[str, Any]] = list(rows or [])
        atomic_write(self.dir / "scenario.yaml", scenario_yaml)
        atomic_write(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    @classmethod
    def reopen(cls, out_dir: str | Path, rows: list[dict[str, Any]]) -> "ResultsWriter":
        """The writer of a finished run's folder, to draw what it did not (nothing is rewritten)."""
        writer = cls.__new__(cls)
        writer.dir, writer.rows = Path(out_dir), list(rows)
        return writer

    def add_round(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        path = self.dir / "metrics.jsonl"
        data = (json.dumps(row) + "\n").encode()
        with disk_full_as_error(path), open(path, "ab") as fh:  # one write: a kill tears at most this line
            end = fh.seek(0, os.SEEK_END)
            try:
                fh.write(data)
                fh.flush()
            except OSError:  # a full disk: cut off what part of the line was written, keep the rounds before
                with contextlib.suppress(OSError):
                    os.ftruncate(fh.fileno(), end)
                raise
        self.rows.append(row)

    def finish(self, summary: dict[str, Any], plot: bool = True, audit_rows: list[dict[str, Any]] | None = None) -> None:
        atomic_write(self.dir / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")
        if plot and self.rows:
            self.plot_accuracy()
            if has_virtual_time(self.rows):
                self.plot_accuracy_over_time()
            if audit_rows:
                self.plot_audit(audit_rows)

    def plot_audit(self, audit_rows: list[dict[str, Any]]) -> None:
        """The audit's PSNR per audited round (every client, and the worst case) beside accuracy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        scored = [r for r in audit_rows if r.get("psnr") is not None]
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=120)
        ax.scatter([r["round"] for r in scored], [r["psnr"] for r in scored], s=12, alpha=0.5, label="client")
        rounds = sorted({r["round"] for r in scored})
        worst = [max(r["psnr"] for r in scored if r["round"] == rnd) for rnd in rounds]
        ax.plot(rounds, worst, color="C3", marker=".", label="worst (max)")
        ax.axhline(20, color="grey", lw=0.8, ls="--")  # the success threshold of shared/specs/privacy.md
        ax.set_xlabel("round")
        ax.set_ylabel("audit PSNR (dB)")
        twin = ax.twinx()
        twin.plot([r["round"] for r in self.rows], [r["accuracy"] for r in self.rows], color="C2", alpha=0.7)
        twin.set_ylabel("central test accuracy", color="C2")
        ax.legend(loc="lower left", fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self._save(fig, "audit_psnr.png")

    def plot_accuracy(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot([r["round"] for r in self.rows], [r["accuracy"] for r in self.rows], marker=".")
        ax.set_xlabel("round")
        ax.set_ylabel("central test accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self._save(fig, "accuracy.png")

    def plot_accuracy_over_time(self) -> None:
        """Accuracy against the virtual clock (docs/time.md): what a round costs on the clients' devices."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        draw_accuracy_over_time(ax, self.rows)
        fig.tight_layout()
        self._save(fig, "accuracy_time.png")

    def _save(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        with disk_full_as_error(self.dir / name):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".png")
            try:
                os.fchmod(fd, _FILE_MODE)
                os.close(fd)
                fig.savefig(tmp)
                os.replace(tmp, self.dir / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            finally:
                plt.close(fig)


def has_virtual_time(rows: list[dict[str, Any]]) -> bool:
    """Whether metrics.jsonl ``rows`` carry the virtual clock's ``virtual_time_s`` (a ``system`` section)."""
    return any(r.get("virtual_time_s") is not None for r in rows)


def draw_accuracy_over_time(ax, rows: list[dict[str, Any]], label: str | None = None) -> None:
    """Central accuracy against virtual time on ``ax`` (one point a round); rounds that dropped stragglers marked
    (the sweep report can draw one line per run on a shared axis with ``label``)."""
    timed = [r for r in rows if r.get("virtual_time_s") is not None]
    line, = ax.plot([r["virtual_time_s"] for r in timed], [r["accuracy"] for r in timed], marker=".", label=label)
    late = [r for r in timed if r.get("stragglers")]
    if late:
        ax.plot([r["virtual_time_s"] for r in late], [r["accuracy"] for r in late], "x", color=line.get_color(),
                label=f"{label + ': ' if label else ''}round dropped stragglers")
        ax.legend(fontsize=7)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("central test accuracy")
    ax.grid(alpha=0.3)


def has_epsilon(rows: list[dict[str, Any]]) -> bool:
    """Whether metrics.jsonl ``rows`` carry an accountant's ``epsilon`` or an empirical ``epsilon_est``
    (an unbounded estimate is written as None but still has its key)."""
    return any(r.get("epsilon") is not None or "epsilon_est" in r for r in rows)


def draw_epsilon(ax, rows: list[dict[str, Any]], threat: str | None = None) -> None:
    """The accountant's epsilon (``epsilon``, spent so far) and the canaries' empirical figures
    (fedsim.privacy.run) against rounds, on ``ax``, whichever ``rows`` carry: ``epsilon_est``, the estimate's
    95% lower confidence bound (what a run reports), and the paper's point estimate ``epsilon_est_point`` with
    its bootstrap interval ``epsilon_est_low`` .. ``epsilon_est_high`` (rows written before the bound existed
    carry no ``epsilon_est_point``: their ``epsilon_est`` was the point estimate). A figure that is unbounded
    (None in metrics.jsonl) is drawn at the top of the axes, marked as such. ``threat``: the estimate's threat
    model (summary.json's ``epsilon_est_threat``), for the legend."""
    accountant = [(r["round"], r["epsilon"]) for r in rows if r.get("epsilon") is not None]
    estimated = [r for r in rows if "epsilon_est" in r]
    with_point = any("epsilon_est_point" in r for r in estimated)
    point_key = "epsilon_est_point" if with_point else "epsilon_est"
    finite = [v for r in estimated for v in (r.get("epsilon_est"), r.get(point_key), r.get("epsilon_est_low"),
                                             r.get("epsilon_est_high")) if v is not None]
    finite += [e for _, e in accountant]
    top = 1.15 * max(finite) if finite else 1.0
    if accountant:
        ax.plot(*zip(*accountant), marker=".", color="C0", label="accountant (upper bound)")
    if estimated:
        x = [r["round"] for r in estimated]
        low = [r.get("epsilon_est_low") or 0.0 for r in estimated]
        high = [r["epsilon_est_high"] if r.get("epsilon_est_high") is not None else top for r in estimated]
        ax.fill_between(x, low, high, color="C1", alpha=0.2, step=None, label="point estimate's interval")
        suffix = f", {threat}" if threat else ""
        points = [(r["round"], r[point_key]) for r in estimated if r.get(point_key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, color="C1", ls="--" if with_point else "-",
                    label="empirical point estimate (paper)" + suffix if with_point else "empirical (canaries)" + suffix)
        if with_point:
            bounds = [(r["round"], r["epsilon_est"]) for r in estimated if r.get("epsilon_est") is not None]
            if bounds:
                ax.plot(*zip(*bounds), marker="s", ms=3, color="C2", label="empirical: 95% lower bound" + suffix)
        unbounded = [r["round"] for r in estimated if r.get(point_key) is None]
        if unbounded:
            ax.plot(unbounded, [top] * len(unbounded), "^", color="C3", label="empirical: unbounded")
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.legend(fontsize=7)


class RunFileError(ValueError):
    """A file of a run folder that cannot be read as fedsim wrote it (not UTF-8, not JSON, the wrong
    shape); the message is one line naming the file and the problem."""


# A run file larger than this is not one fedsim wrote for any sensible run (read whole otherwise).
MAX_RUN_FILE_BYTES = 1 << 30


def read_text(path: str | Path) -> str:
    """A run file as UTF-8 text; RunFileError naming it when it cannot be read or is not text."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RUN_FILE_BYTES:
            raise RunFileError(f"{path}: {size / 2**20:.0f} MiB is too large for a fedsim run file")
        data = path.read_bytes()
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RunFileError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line})") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding one object (summary.json); RunFileError naming the file otherwise."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError; also a number too deep or too long
        raise RunFileError(f"{path}: not JSON ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise RunFileError(f"{path}: not JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def read_jsonl(path: str | Path, *, torn_tail: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, one a line; RunFileError naming the file and the line of
    the first that is not JSON or not an object. ``torn_tail``: text after the last newline is a
    torn append (a run killed mid-write) and is left out."""
    text = read_text(path)
    if torn_tail:
        text = text[: text.rfind("\n") + 1]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RunFileError(f"{path}: line {n} is not JSON ({str(exc).splitlines()[0][:200]})") from None
        except RecursionError:
            raise RunFileError(f"{path}: line {n} is not JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path}: line {n} is a JSON {type(row).__name__}, expected an object")
        rows.append(row)
    return rows


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds in metrics.jsonl. Every round's line ends with a newline, written in one call;
    text after the last newline is a torn write (a run killed mid-append) and is left out.
    RunFileError naming the file when it is not UTF-8, a line is not a JSON object, or the rounds
    are not 1, 2, 3 ... in order."""
    path = Path(out_dir) / "metrics.jsonl"
    rows = read_jsonl(path, torn_tail=True)
    for i, row in enumerate(rows, 1):
        if not _is_int(row.get("round")) or row["round"] != i:
            raise RunFileError(f"{path}: row {i} has round {repr(row.get('round'))[:40]}, expected {i} "
                               f"(rounds 1, 2, 3 ... in order)")
    return rows
