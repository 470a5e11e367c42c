"""What every fedsim command line shares: the exit codes, the argument parser that says what is
wrong in one line, and the run summary table. A leaf: imports nothing else of fedsim, so
``fedsim.cli``, the sweep, the report, resume and the attack CLI import it without importing
one another.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the run went, but every client failed
EXIT_BAD_INPUT = 2  # bad input: one line on stderr, before any output directory exists
EXIT_INTERRUPTED = 130  # Ctrl-C, or SIGTERM (``sigterm_as_ctrl_c``)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def sigterm_as_ctrl_c() -> None:
    """Make SIGTERM (``kill PID``, a batch scheduler's or systemd's stop) raise KeyboardInterrupt in the
    main thread, as Ctrl-C does, so that every command's Ctrl-C handling covers it: one line, exit 130,
    a run left resumable, Ray stopped by the ``with`` blocks that started it. Python's default for
    SIGTERM is to die on the spot, and once Ray is up its C++ failure handler prints a stack dump and
    exits 15. Installed by ``python -m fedsim`` (``fedsim.__main__``) only: a program using fedsim as a
    library keeps its own handling. ``fedsim.engines.ray_cluster`` puts it back after ``ray.init``,
    which replaces it."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGTERM, _terminated)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"fedsim: error: {message.splitlines()[0][:500] if message else 'bad arguments'}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def print_table(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedsim: {summary['name']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("final accuracy", f"{summary['accuracy']:.4f}")
    table.add_row("best accuracy", f"{summary['best_accuracy']:.4f}")
    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("bytes up", f"{summary['bytes_up_total'] / 1e6:.2f} MB")
    table.add_row("bytes down", f"{summary['bytes_down_total'] / 1e6:.2f} MB")
    table.add_row("client failures", str(summary["failures_total"]))
    if summary.get("audit_worst_psnr") is not None:
        table.add_row("audit: worst PSNR", f"{summary['audit_worst_psnr']:.1f} dB (round "
                      f"{summary['audit_worst_psnr_round']}, client {summary['audit_worst_psnr_client']}; "
                      f"{summary['audits']} audits)")
    if summary.get("epsilon") is not None:
        table.add_row("privacy: epsilon", f"{summary['epsilon']:.3f} (max over clients; delta {summary['delta']:g})")
    if summary.get("clip_fraction") is not None:
        table.add_row("DP-SGD: clipped per-sample gradients", f"{summary['clip_fraction']:.1%} (last round)")
    if summary.get("update_clip_fraction") is not None:
        table.add_row("updates clipped", f"{summary['update_clip_fraction']:.1%} (last round)")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("results", str(out_dir))
    Console().print(table)

