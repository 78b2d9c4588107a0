"""Safe output directories: where build.py and hf_llama_convert.py may write, and how.

Rules (checked before any work, and again just before the swap):

* the target is a new directory, or one holding an engine or checkpoint this project wrote
  (recognised by its ``config.json``); anything else only with ``force``;
* never, even with ``force``: a source of the build (or a folder holding one), the current
  directory or a folder holding it, a file, a symbolic link.

On-disk protocol. Everything is written into a staging directory beside the target; every
intermediate state has its own name, so the next write into the same place can tell what
happened (``<id>`` is 12 hex digits, one per write):

====================  ============================================  ===========================
name (beside OUT)     meaning                                       next write does
====================  ============================================  ===========================
``.tmp-OUT-<id>``     being written (holds ``STAGING_MARKER`` with  remove it when its process
                      the writer's pid)                             is gone (report it if not)
``.ready-OUT-<id>``   complete, not yet moved into place            move it into place
``.old-OUT-<id>``     the previous OUT, parked during the swap      OUT present: remove it;
                                                                    else restore it (unless a
                                                                    ready one moves in)
====================  ============================================  ===========================

The swap: ``.tmp`` -> ``.ready``; OUT -> ``.old``; ``.ready`` -> OUT; remove ``.old``. SIGTERM
and SIGINT raise inside Python while a write is under way (so the staging directory is
removed) and are held back during the three renames (so they never stop between them).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from typing import Iterable, Iterator, Optional

from .config import ConfigError

STAGING_MARKER = ".llama_engine-writing"
_LEFTOVER = re.compile(r"^\.(tmp|ready|old)-(.+)-([0-9a-f]{12})$")


class OutputDirError(ConfigError):
    """An output directory this project must not write into."""


# ---------------------------------------------------------------------------------------------
# What a directory is
# ---------------------------------------------------------------------------------------------
def _read_config(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_project_output(path: str) -> bool:
    """True for a directory this project writes: our engine (``backend`` + ``format_version``),
    a TensorRT-LLM unified checkpoint (``architecture`` + ``quantization``; an HF folder has
    ``architectures``) or a TensorRT-LLM engine (``pretrained_config`` + ``build_config``)."""
    d = _read_config(path)
    if d is None:
        return False
    engine = "backend" in d and "format_version" in d
    checkpoint = "architecture" in d and "quantization" in d and "architectures" not in d
    trt_engine = "pretrained_config" in d and "build_config" in d
    return engine or checkpoint or trt_engine


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (both real paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, sources: Iterable[Optional[str]] = (), force: bool = False,
                     flag: str = "--output_dir") -> str:
    """The absolute path to write, after recovering an interrupted earlier write; raises
    ``OutputDirError`` (one line) where writing there could lose a user's files.

    ``sources``: files or folders the write reads from (None entries are skipped); a file's
    folder counts as the source."""
    if not out:
        raise OutputDirError(f"{flag} is empty")
    path = os.path.abspath(out)
    if os.path.islink(path):
        raise OutputDirError(f"{flag} {out} is a symbolic link; name the directory itself")
    real = _real(path)
    if os.path.dirname(real) == real:
        raise OutputDirError(f"{flag} {out} is the root directory")
    if _within(_real(os.getcwd()), real):
        raise OutputDirError(f"{flag} {out} is the current directory or holds it; "
                             "choose a new directory")
    for src in sources:
        if not src:
            continue
        s = _real(src)
        if os.path.isfile(s):
            s = os.path.dirname(s)
        if _within(s, real):
            raise OutputDirError(f"{flag} {out} is the source {src} or holds it; choose a "
                                 "new directory")
    recover(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OutputDirError(f"{flag} {out} exists and is not a directory")
        if not force and os.listdir(path) and not is_project_output(path):
            raise OutputDirError(f"{flag} {out} exists and holds no engine or checkpoint "
                                 "written by this project; choose a new directory or pass "
                                 "--force to replace it")
    return path


# ---------------------------------------------------------------------------------------------
# Recovery of interrupted writes
# ---------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_owner(path: str) -> Optional[int]:
    """The writer's pid in a staging directory's marker; None when there is none."""
    try:
        with open(os.path.join(path, STAGING_MARKER), encoding="utf-8") as f:
            return int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _leftovers(path: str) -> dict[str, dict[str, str]]:
    """{id: {kind: full path}} of this target's staging/parked siblings."""
    parent, base = os.path.split(path)
    found: dict[str, dict[str, str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(parent):
            m = _LEFTOVER.match(name)
            full = os.path.join(parent, name)
            if m and m.group(2) == base and os.path.isdir(full) and not os.path.islink(full):
                found.setdefault(m.group(3), {})[m.group(1)] = full
    return found


def recover(out: str) -> list[str]:
    """Finish or undo what an interrupted write into ``out`` left beside it; returns the
    notes printed (one per leftover)."""
    path = os.path.abspath(out)
    notes = []

    def note(msg):
        notes.append(msg)
        _note(msg)

    for wid, kinds in sorted(_leftovers(path).items()):
        tmp, ready, old = kinds.get("tmp"), kinds.get("ready"), kinds.get("old")
        if tmp:
            owner = _staging_owner(tmp)
            if owner == os.getpid():
                continue  # this process's own write, under way
            size = human_size(dir_size(tmp))
            if owner is not None and _pid_alive(owner):
                note(f"{tmp} ({size}) is being written by process {owner}; left alone")
            elif owner is not None or not os.listdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                note(f"removed {tmp} ({size}), left by an interrupted write")
            else:
                note(f"{tmp} ({size}) looks like an interrupted write but has no "
                     f"{STAGING_MARKER}; left alone, remove it yourself")
        if ready and is_project_output(ready):
            if os.path.lexists(path) and old is None:
                # Complete but never swapped in: the newest complete output wins.
                old = _park(path, wid)
            if not os.path.lexists(path):
                _unmark(ready)
                os.rename(ready, path)
                note(f"moved the complete output of an interrupted write into {path}")
        if old:  # named after the target it was renamed from: ours even half removed
            if os.path.lexists(path):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, path)
                note(f"restored {path} from {old}, parked by an interrupted write")
    return notes


def _park(path: str, wid: str) -> str:
    old = os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}-{wid}")
    os.rename(path, old)
    return old


def _unmark(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, STAGING_MARKER))


# ---------------------------------------------------------------------------------------------
# Signals: raise inside Python during a write, held back during the swap
# ---------------------------------------------------------------------------------------------
class _Signals:
    """SIGTERM/SIGINT as exceptions for the duration of a ``with``; nestable."""

    def __init__(self):
        self.depth = 0
        self.critical = 0
        self.pending: Optional[int] = None
        self.saved: dict = {}

    def _handler(self, signum, frame):
        if self.critical:
            self.pending = signum  # raised once the renames are done
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set from the main thread
            return
        if self.depth == 0:
            for s in (signal.SIGTERM, signal.SIGINT):
                self.saved[s] = signal.signal(s, self._handler)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for s, h in self.saved.items():
                    signal.signal(s, h)
                self.saved.clear()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.critical += 1
        try:
            yield
        finally:
            self.critical -= 1
        if not self.critical and self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum)


_SIGNALS = _Signals()


def signals_raise():
    """``with signals_raise():`` SIGTERM raises SystemExit(143), SIGINT KeyboardInterrupt, so
    ``finally`` blocks (the staging directory's removal) run. build.py wraps a whole build."""
    return _SIGNALS.raising()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _make_staging(path: str) -> tuple[str, str]:
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    wid = secrets.token_hex(6)
    tmp = os.path.join(parent, f".tmp-{base}-{wid}")
    os.mkdir(tmp)
    with open(os.path.join(tmp, STAGING_MARKER), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "target": path}, f)
    return tmp, wid


def _publish(tmp: str, path: str, wid: str) -> None:
    """The swap, with every state on the way recognisable by ``recover``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    ready = os.path.join(os.path.dirname(path), f".ready-{os.path.basename(path)}-{wid}")
    old = None
    try:
        with _SIGNALS.held():  # a signal held here is raised on leaving, after the renames
            os.rename(tmp, ready)
            _unmark(ready)
            if os.path.lexists(path):
                old = _park(path, wid)
            os.rename(ready, path)
    finally:
        if old and os.path.lexists(path):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(out: str, sources: Iterable[Optional[str]] = (), force: bool = False,
            flag: str = "--output_dir") -> Iterator[str]:
    """``with writing(out, sources) as tmp:`` write into ``tmp``; on a normal exit it
    replaces ``out`` (checked by ``check_output_dir``); on an exception, SIGTERM or SIGINT
    it is removed and ``out`` is left exactly as it was."""
    sources = list(sources)
    path = check_output_dir(out, sources, force, flag)
    with signals_raise():
        tmp, wid = _make_staging(path)
        try:
            yield tmp
            check_output_dir(out, sources, force, flag)  # the target may have changed since
            _publish(tmp, path, wid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a publish
