"""A run's output folder: checked before any work, owned by one run at a time.

``claim_output_dir(path)`` is what a run (``python -m fedsim``, each run of a sweep, ``python
-m attacks``, ``fedsim resume``) holds while it writes results:

- the path is checked first (``check_output_path``): not a file, no component or whole path
  longer than the file system allows, and its nearest existing folder writable;
- an exclusive ``flock`` on ``.fedsim.lock`` inside the folder, taken without waiting and held
  for the whole run: a second run on the same folder fails at once, writing nothing there. The
  kernel drops the lock when the holder dies, so a killed run never leaves the folder locked;
- a folder that holds another run's results is refused unless ``overwrite``; then fedsim's own
  files are removed first, so no summary or plot of the old run survives beside the new
  metrics. ``resume`` is the opposite: the folder must hold a run, and it is kept as it is.

A folder holding anything fedsim does not write is refused for a new run, with or without
``overwrite``: fedsim deletes only what it can tell it wrote, and a run's folder holds one run
and nothing else. (A folder that is not fedsim's, such as ``--out .`` or ``name: ..``'s working
folder, is the common case.) "What fedsim writes" is exact: the names in ``RESULT_FILES``, the
files of ``RESULT_DIRS`` by their exact name templates, a tracker's store (``RESULT_TREES``), and the
temporary files of fedsim's atomic writes, which are named ``.<final name>.<8 characters of tempfile>.tmp`` (or ``.png``)
after one of those files; all of them plain files, never links or folders. A user's
``checkpoint_best.pt``, ``checkpoints/``, hidden ``.notes.tmp`` or ``.cover.png`` is not
fedsim's, so it is never removed: its folder is refused, naming it.

Errors are ``OutputDirError``, one line naming the folder; the commands print it and exit 2.
Leaf module.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".fedsim.lock"

# What fedsim writes into a run's folder: a run (fedsim.run.results, fedsim.audit, the
# checkpoint of ``output.checkpoint_every``: fedsim.run.checkpoint), its page
# (fedsim.compare.report) and the attack script (attacks.cli). Exact names: nothing else is fedsim's.
RESULT_FILES = frozenset({
    "scenario.yaml", "metrics.jsonl", "summary.json", "accuracy.png", "accuracy_time.png", "audit.jsonl",
    "audit_psnr.png",
    "report.html", "results.json", "reconstruction.png", "checkpoint.pkl",
})
# Folders fedsim fills, with the exact names (a regular expression) of what they may hold:
# fedsim.audit's reconstructions, fedsim.compare.report's plots.
RESULT_DIRS = {"audit": r"round-[0-9]+-client-[0-9]+\.(?:png|npz)", "report": r"[a-z_]+\.png",
               "tensorboard": r"events\.out\.tfevents\.[0-9]+\..+"}  # fedsim.trackers.tensorboard's event files
# Folders a tracker's own store fills (fedsim.trackers.mlflow: MLflow's database and artifact tree, whose
# layout is MLflow's): the exact names at their top; removed whole, and only when they hold no link.
RESULT_TREES = {"mlflow": r"mlflow\.db(?:-journal|-wal|-shm)?|artifacts"}
# Temporary files of atomic writes (results.atomic_write, checkpoint._write, the plots) left by
# a killed run: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp" or ".png") puts 8 characters
# of [a-z0-9_] between; fedsim.compare.report's plots use ".<name>.tmp.png".
_TEMPORARY = r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.(?:tmp|png)|tmp\.png)"
# Room for the longest name fedsim writes inside the folder (a temp file of an audit PNG).
_INSIDE = 64


class OutputDirError(ValueError):
    """An output folder a run cannot use; the message is one line naming the folder."""


def check_output_path(path: str | Path) -> None:
    """Raise OutputDirError unless ``path`` can be created (or exists) as a writable folder.

    Pure: reads the file system, writes nothing."""
    path = Path(path)
    if "\0" in str(path):
        raise OutputDirError(f"{str(path)[:200]!r}: a folder name cannot hold a NUL character")
    full = path.absolute()
    nearest = full
    while True:  # the nearest existing ancestor tells the file system's limits
        try:
            if nearest.exists() or nearest == nearest.parent:
                break
        except OSError:  # ENAMETOOLONG from stat: found by the length checks below
            pass
        nearest = nearest.parent
    name_max = _pathconf(nearest, "PC_NAME_MAX", 255)
    path_max = _pathconf(nearest, "PC_PATH_MAX", 4096)
    for part in full.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputDirError(f"{_show(path)}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; "
                                 f"this file system allows {name_max}")
    if len(os.fsencode(str(full))) + _INSIDE > path_max:
        raise OutputDirError(f"{_show(path)}: the path is {len(os.fsencode(str(full)))} bytes long; this file "
                             f"system allows {path_max} (less {_INSIDE} for the files inside)")
    if full.exists() and not full.is_dir():
        raise OutputDirError(f"{_show(path)} is a file, not a folder")
    if not nearest.is_dir():
        raise OutputDirError(f"{_show(path)}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputDirError(f"{_show(path)}: cannot write in {nearest} (permission denied)")


def check_output_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Everything ``claim_output_dir`` checks except the lock, without writing anything: for
    a command that checks its outputs before it starts work (a sweep, its every run)."""
    check_output_path(path)
    if Path(path).is_dir():
        _check_contents(Path(path), overwrite=overwrite, resume=resume)


@contextmanager
def claim_output_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``path`` as a run's output folder for the ``with`` block (module docstring).

    Creates the folder; with ``overwrite``, clears the results of the run it held. A refusal
    leaves the file system as it was: folders created for the claim are removed again, and so
    is a folder the run wrote nothing into (a run refused by a later check)."""
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other")
    path = Path(path)
    check_output_path(path)
    created = _make_dirs(path)
    try:
        with hold_folder(path):
            _check_contents(path, overwrite=overwrite, resume=resume)
            if overwrite:
                _clear(path)
            yield path
    finally:
        for folder in reversed(created):  # deepest first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def hold_folder(path: str | Path) -> Iterator[None]:
    """The exclusive, non-blocking lock on an existing folder (``LOCK_NAME`` inside it).

    The lock file is removed on release, leaving the folder as the run left it. Removing
    it races with a run that opened the file just before: that run then locks a file no
    longer in the folder, so after locking, the file at the path must be the one locked."""
    path = Path(path)
    lock = path / LOCK_NAME
    while True:
        try:
            # O_CREAT on an existing file writes nothing: a refused run leaves the folder as it was.
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputDirError(f"{_show(path)}: cannot create {LOCK_NAME} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputDirError(f"{_show(path)}: cannot lock {LOCK_NAME} ({exc.strerror})") from None
            raise OutputDirError(f"{_show(path)} is in use by another run{_holder(lock)}; wait for it to end "
                                 f"or choose another folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the message a refused run prints
        yield
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; the folders created, outermost first."""
    missing = []
    p = path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    missing.reverse()
    for i, folder in enumerate(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise OutputDirError(f"{_show(path)}: {folder} is a file, not a folder") from None
        except OSError as exc:
            for done in reversed(missing[:i]):
                done.rmdir()
            raise OutputDirError(f"{_show(path)}: cannot create {folder} ({exc.strerror})") from None
    return missing


def _own(entry: Path) -> bool:
    """Whether fedsim writes ``entry`` (a name in a run's folder) and what it holds."""
    name = entry.name
    if name == LOCK_NAME or name in RESULT_FILES or _temporary(name, RESULT_FILES.__contains__):
        return _plain_file(entry)
    if name in RESULT_TREES:
        return _own_tree(entry, RESULT_TREES[name])
    pattern = RESULT_DIRS.get(name)
    if pattern is None or entry.is_symlink() or not entry.is_dir():
        return False
    def own(n: str) -> bool:
        return re.fullmatch(pattern, n) is not None
    return all(_plain_file(c) and (own(c.name) or _temporary(c.name, own)) for c in entry.iterdir())


def _own_tree(entry: Path, top: str) -> bool:
    """Whether ``entry`` is a tracker's store: a folder (not a link) whose top holds only ``top``'s names and
    whose whole tree holds no link (removing it never reaches outside)."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    if not all(re.fullmatch(top, child.name) for child in entry.iterdir()):
        return False
    for folder, dirs, files in os.walk(entry):
        if any(os.path.islink(os.path.join(folder, n)) for n in (*dirs, *files)):
            return False
    return True


def _temporary(name: str, final: Callable[[str], bool]) -> bool:
    """Whether ``name`` is the temporary file of an atomic write of a file named as ``final`` says."""
    m = re.fullmatch(_TEMPORARY, name)
    return m is not None and final(m["name"]) and (not name.endswith(".png") or m["name"].endswith(".png"))


def _plain_file(entry: Path) -> bool:
    return entry.is_file() and not entry.is_symlink()


def _check_contents(path: Path, *, overwrite: bool, resume: bool) -> None:
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise OutputDirError(f"{_show(path)}: cannot list the folder ({exc.strerror})") from None
    if resume:
        if not (path / "scenario.yaml").is_file():
            raise OutputDirError(f"{_show(path)} holds no run to resume (no scenario.yaml)")
        return
    foreign = [e.name for e in entries if not _own(e)]
    if foreign:
        raise OutputDirError(f"{_show(path)} holds files fedsim did not write ({_names(foreign)}); a run's folder "
                             f"holds its results only: choose another folder")
    results = [e.name for e in entries if e.name != LOCK_NAME and not _temporary(e.name, RESULT_FILES.__contains__)]
    if results and not overwrite:
        raise OutputDirError(f"{_show(path)} holds the results of another run ({_names(results)}); pass "
                             f"--overwrite to replace them, or choose another folder")


def clear_results(path: str | Path) -> None:
    """Remove fedsim's own files from ``path``, a folder this process holds (``claim_output_dir``), and
    nothing else: for a run interrupted before its first round, whose folder then holds only what this
    run wrote (the claim refused, or with ``overwrite`` cleared, any earlier run's results)."""
    _clear(Path(path))


def _clear(path: Path) -> None:
    """Remove fedsim's own entries, and nothing else: each is checked again as it is removed (a
    file put in the folder after ``_check_contents`` stays, and so does its folder)."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.name in RESULT_TREES:
            if _own_tree(entry, RESULT_TREES[entry.name]):
                shutil.rmtree(entry)
            continue
        pattern = RESULT_DIRS.get(entry.name)
        if pattern is not None and entry.is_dir() and not entry.is_symlink():
            def own(n: str) -> bool:
                return re.fullmatch(pattern, n) is not None
            for child in entry.iterdir():
                if _plain_file(child) and (own(child.name) or _temporary(child.name, own)):
                    child.unlink()
            try:
                entry.rmdir()
            except OSError:  # not empty: what is left is not fedsim's
                pass
        elif _own(entry):
            entry.unlink()


def _names(names: list[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(n[:60] for n in names[:shown]) + more


def _show(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else text[:100] + "..." + text[-60:]


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
