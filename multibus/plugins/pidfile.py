"""PIDFile: a locked PID file that refuses a second live instance and survives crashes.

CherryPy's PIDFile blindly overwrites the file, so two instances both "own" it and a crash
leaves a file naming a dead (or reused) PID. Here:

* The file is a :mod:`multibus.lockfile` (``O_CLOEXEC|O_NOFOLLOW``, 0600, held with
  ``flock(LOCK_EX|LOCK_NB)`` for the life of the bus; the kernel drops the lock when the
  process dies, however it dies; an inode unlinked under us is not taken for the file).
  Failing to lock means a live owner: we raise naming it.
* The content is ``"<pid> <create_time>\\n"``: readers (:func:`read_pidfile`) compare psutil's
  create time, so a PID reused by an unrelated process is not mistaken for the owner.
* Content left by a dead owner, or naming a reused PID, is taken over with a log line.
* On 'exit' the file is unlinked (only if it is still ours) and the fd closed.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import psutil

from multibus import lockfile
from multibus.lockfile import parse_record

from .base import SimplePlugin

CREATE_TIME_TOLERANCE = 1.5
"""Seconds two create times may differ and still be the same process: psutil adds the boot time,
which the kernel reports rounded to whole seconds and which can move by one."""


class PIDFileError(RuntimeError):
    """The PID file is owned by another live process or cannot be used; ``pid``: the live
    owner it names (None when there is none)."""

    def __init__(self, msg: str, pid: int | None = None) -> None:
        super().__init__(msg)
        self.pid = pid


def _process_matches(pid: int, create_time: float | None) -> bool:
    """True if ``pid`` runs and (when known) was created at ``create_time``."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        actual = proc.create_time()
    except psutil.Error:
        return False
    return create_time is None or abs(actual - create_time) <= CREATE_TIME_TOLERANCE


def read_pidfile(path: str | os.PathLike[str]) -> int | None:
    """Return the PID recorded in ``path`` if that process is alive and is the one that wrote it.

    None when the file is missing, empty, malformed, its process is dead, or its PID now belongs
    to another process (create time differs). A file without a create time (CherryPy's format)
    is accepted on the PID alone.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(256)
    except OSError:
        return None
    pid, ctime = parse_record(text)
    if pid is None or not _process_matches(pid, ctime):
        return None
    return pid


class PIDFile(SimplePlugin):
    """Maintain a locked PID file at ``pidfile`` while the bus runs (created on 'start')."""

    def __init__(self, bus: Any, pidfile: str | os.PathLike[str]) -> None:
        super().__init__(bus)
        self.pidfile = os.fspath(pidfile)
        self._held: lockfile.LockedFile | None = None

    @property
    def fd(self) -> int | None:
        """The locked file's descriptor while we hold it."""
        return None if self._held is None else self._held.fd

    @property
    def finalized(self) -> bool:
        """True while we hold the file (CherryPy compatibility)."""
        return self._held is not None

    def _open_locked(self) -> lockfile.LockedFile:
        """Open and lock the file, or raise PIDFileError naming the owner."""
        try:
            return lockfile.acquire(self.pidfile)
        except OSError as e:
            hint = ("it is a symlink; remove it or choose another path"
                    if e.errno == errno.ELOOP
                    else "check the directory exists and is writable")
            raise PIDFileError(
                f"cannot open PID file {self.pidfile}: {e.strerror}; {hint}") from None
        except lockfile.LockBusy as busy:
            pid, ctime = parse_record(busy.text)
            live = pid if pid is not None and _process_matches(pid, ctime) else None
            raise PIDFileError(self._owner_message(pid, ctime), live) from None
        except lockfile.LockReplaced:
            raise PIDFileError(f"PID file {self.pidfile} keeps being replaced by another "
                               "process; make sure only one program manages it") from None
        except lockfile.LockUnsafe as unsafe:
            raise PIDFileError(f"refusing PID file {self.pidfile}: {unsafe.text}; remove it, "
                               "or choose a path in a directory only you can write") from None

    def _owner_message(self, pid: int | None, ctime: float | None) -> str:
        fix = "stop it first or use another PID file path"
        if pid is not None and _process_matches(pid, ctime):
            return (f"PID file {self.pidfile} is locked by a running instance (pid {pid}); "
                    f"{fix} (e.g. kill -TERM {pid})")
        return (f"PID file {self.pidfile} is locked by another process (recorded pid {pid} "
                f"is not it, perhaps a child that inherited the lock; see `fuser {self.pidfile}`); "
                f"{fix}")

    def start(self) -> None:
        """Lock the file, take over stale content, write ``"pid create_time"``."""
        if self._held is not None:
            self.bus.log(f"PID {os.getpid()} already written to {self.pidfile!r}.", 10)
            return
        held = self._open_locked()
        try:
            old = held.read().strip()
            if old:
                self._log_takeover(old)
            me = psutil.Process()
            held.write(f"{me.pid} {me.create_time()!r}\n", sync=True)
        except BaseException:
            held.close()
            raise
        self._held = held
        self.bus.log(f"PID {me.pid} written to {self.pidfile!r}.")

    start.priority = 70  # type: ignore[attr-defined]  # after Daemonizer (65): the daemon's pid

    def _log_takeover(self, old: str) -> None:
        pid, ctime = parse_record(old)
        if pid is None:
            why = f"unreadable content {old[:40]!r}"
        elif pid == os.getpid():
            why = f"it names this process (pid {pid}, re-executed?)"
        elif not psutil.pid_exists(pid):
            why = f"its owner pid {pid} is dead"
        elif _process_matches(pid, ctime):
            self.bus.log(f"Taking over PID file {self.pidfile}: pid {pid} is alive but did not "
                         "hold the lock (a writer that does not lock?)", 30)
            return
        else:
            why = f"pid {pid} now belongs to another process (create time differs)"
        self.bus.log(f"Taking over stale PID file {self.pidfile}: {why}.", 30)

    def exit(self) -> None:
        """Unlink the file if it is still ours, then close (and so unlock) it."""
        held, self._held = self._held, None
        if held is not None and held.close(unlink=True):
            self.bus.log(f"PID file removed: {self.pidfile!r}.")
