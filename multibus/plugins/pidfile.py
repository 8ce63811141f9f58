"""PIDFile: a locked PID file that refuses a second live instance and survives crashes.

CherryPy's PIDFile blindly overwrites the file, so two instances both "own" it and a crash
leaves a file naming a dead (or reused) PID. Here:

* The file is opened ``O_CREAT|O_CLOEXEC|O_NOFOLLOW`` with mode 0600 and held with
  ``flock(LOCK_EX|LOCK_NB)`` for the life of the bus; the kernel drops the lock when the process
  dies, however it dies. Failing to lock means a live owner: we raise naming it.
* After locking we check the locked inode is still the one at the path (an exiting owner
  unlinks it between our open and our lock) and retry if not.
* The content is ``"<pid> <create_time>\\n"``: readers (:func:`read_pidfile`) compare psutil's
  create time, so a PID reused by an unrelated process is not mistaken for the owner.
* Content left by a dead owner, or naming a reused PID, is taken over with a log line.
* On 'exit' the file is unlinked (only if it is still ours) and the fd closed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

import psutil

from .base import SimplePlugin

CREATE_TIME_TOLERANCE = 1.5
"""Seconds two create times may differ and still be the same process: psutil adds the boot time,
which the kernel reports rounded to whole seconds and which can move by one."""

_LOCK_RETRIES = 20


class PIDFileError(RuntimeError):
    """The PID file is owned by another live process or cannot be used."""


def _parse(text: str) -> tuple[int | None, float | None]:
    parts = text.split()
    try:
        pid = int(parts[0]) if parts else None
    except ValueError:
        return None, None
    try:
        ctime = float(parts[1]) if len(parts) > 1 else None
    except ValueError:
        ctime = None
    return pid, ctime


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
    pid, ctime = _parse(text)
    if pid is None or not _process_matches(pid, ctime):
        return None
    return pid


def _read_fd(fd: int) -> str:
    return os.pread(fd, 256, 0).decode("ascii", "replace")


class PIDFile(SimplePlugin):
    """Maintain a locked PID file at ``pidfile`` while the bus runs (created on 'start')."""

    def __init__(self, bus: Any, pidfile: str | os.PathLike[str]) -> None:
        super().__init__(bus)
        self.pidfile = os.fspath(pidfile)
        self.fd: int | None = None
        self._stat: os.stat_result | None = None

    @property
    def finalized(self) -> bool:
        """True while we hold the file (CherryPy compatibility)."""
        return self.fd is not None

    def _open_locked(self) -> int:
        """Open and lock the file; return the fd, or raise PIDFileError naming the owner."""
        flags = os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        for _ in range(_LOCK_RETRIES):
            try:
                fd = os.open(self.pidfile, flags, 0o600)
            except OSError as e:
                hint = ("it is a symlink; remove it or choose another path"
                        if e.errno == errno.ELOOP
                        else "check the directory exists and is writable")
                raise PIDFileError(
                    f"cannot open PID file {self.pidfile}: {e.strerror}; {hint}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, ctime = _parse(_read_fd(fd))
                os.close(fd)
                raise PIDFileError(self._owner_message(pid, ctime)) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.pidfile))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # unlinked or replaced between open and lock: try the new one
        raise PIDFileError(f"PID file {self.pidfile} keeps being replaced by another process; "
                           "make sure only one program manages it")

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
        if self.fd is not None:
            self.bus.log(f"PID {os.getpid()} already written to {self.pidfile!r}.", 10)
            return
        fd = self._open_locked()
        try:
            old = _read_fd(fd).strip()
            if old:
                self._log_takeover(old)
            me = psutil.Process()
            data = f"{me.pid} {me.create_time()!r}\n".encode("ascii")
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._stat = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.bus.log(f"PID {me.pid} written to {self.pidfile!r}.")

    start.priority = 70  # type: ignore[attr-defined]  # after Daemonizer (65): the daemon's pid

    def _log_takeover(self, old: str) -> None:
        pid, ctime = _parse(old)
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
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if self._stat is not None and os.path.samestat(self._stat, os.stat(self.pidfile)):
                os.unlink(self.pidfile)
                self.bus.log(f"PID file removed: {self.pidfile!r}.")
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
