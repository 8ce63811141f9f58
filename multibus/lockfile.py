"""A file held with ``flock``: the one way multibus says "this process owns that name".

The PID file and the hub-name lock in the runtime dir are both such files, so the careful
open is written once, here:

* opened ``O_RDWR|O_CLOEXEC|O_NOFOLLOW|O_NONBLOCK`` (mode 0600 when created): a symlink planted
  at the path is refused, and no child inherits the lock;
* refused unless it is a plain file of ours: not a FIFO or device, not a hard link (a second
  name for someone else's file, which we would truncate and chmod), not owned by another user
  (who could still write it) -- :class:`LockUnsafe` says which;
* locked ``LOCK_EX|LOCK_NB``: the kernel drops the lock when its holder dies, however it
  dies, so a lock can never be stale, only its file's content;
* after locking, the locked inode must still be the one at the path (an exiting holder
  unlinks it between our open and our lock); if not, we open the new file and try again;
* a holder removes the file while still holding the lock, so a newcomer cannot lock a dead
  inode;
* a lock held without a live owner's record (none yet, or a dead process's) is not an
  owner's: an owner writes its record as soon as it holds the lock, so the holder is one
  that lets go in a moment -- a sweep (``multibus.rundir.sweep_stale``) that found the file
  unheld (a stale one, or one its new owner has just created and not locked yet) and holds it
  only to remove it, a :func:`probe`, or an owner between its lock and its record. That is
  waited out (up to ``settle`` seconds), never taken for "in use": several supervisors
  started at once each sweep the runtime dir while the others take their files.

Readers get the content as text and parse it with :func:`parse_record` (``"<pid>
[<create_time>]"``), which never raises: the content may be left by a dead holder, be
half-written or be anything at all. The lowest layer: imports nothing of multibus.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

__all__ = ["LockBusy", "LockError", "LockReplaced", "LockUnsafe", "LockedFile", "acquire",
           "parse_record", "probe"]

_READ_MAX = 256
_TRIES = 20  # opens of a file that keeps being replaced before we give up
_BUSY_POLL = 0.005
# seconds a lock held without a live owner's record is waited for at most (a sweep or a
# probe holds it for an instant; this bounds only a holder that is stopped or starved)
_SETTLE = 5.0


class LockError(Exception):
    """The file could not be locked; ``path`` names it."""

    def __init__(self, path: str, text: str = "") -> None:
        super().__init__(path)
        self.path = path
        self.text = text


class LockBusy(LockError):
    """Another open file holds the lock; ``text`` is what the file says (its holder's record)."""


class LockReplaced(LockError):
    """The file kept being unlinked or replaced between our open and our lock."""


class LockUnsafe(LockError):
    """The path is not a plain file of ours; ``text`` says what it is instead."""

    def __str__(self) -> str:
        return f"{self.path}: {self.text}"


def _unsafe(st: os.stat_result) -> str | None:
    """Why a file with status ``st`` must not be taken as a lock file; None when it may."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_nlink > 1:
        return f"it has {st.st_nlink} hard links (it is another name for some other file)"
    if st.st_uid != os.geteuid():
        return f"it belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}"
    return None


def _read(fd: int) -> str:
    return os.pread(fd, _READ_MAX, 0).decode("ascii", "replace")


def _owned(text: str) -> bool:
    """Whether ``text``, a busy lock file's content, is the record of a live process: what
    an owner writes as soon as it holds the lock. Empty (not written yet), garbage or a dead
    pid: the holder is not an owner but a sweep, a probe, or an owner about to write."""
    pid = parse_record(text)[0]
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, another user's
    except (ProcessLookupError, OverflowError):
        return False
    return True


def parse_record(text: str) -> tuple[int | None, float | None]:
    """``"<pid> <create_time>"`` -> ``(pid, create_time)``; a part that is missing or not a
    number is None (so ``"123"`` gives ``(123, None)`` and garbage ``(None, None)``)."""
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


class LockedFile:
    """A file this process holds locked (see :func:`acquire`); ``close()`` lets it go."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def read(self) -> str:
        """The file's content (at most 256 bytes), as text."""
        return _read(self.fd)

    def write(self, text: str, sync: bool = False) -> None:
        """Replace the content with ``text``; make the file 0600 (it may predate us)."""
        os.fchmod(self.fd, 0o600)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode("ascii"), 0)
        if sync:
            os.fsync(self.fd)

    def is_current(self) -> bool:
        """True while the path still names the file we hold."""
        try:
            return os.path.samestat(os.fstat(self.fd), os.lstat(self.path))
        except FileNotFoundError:
            return False

    def close(self, unlink: bool = False) -> bool:
        """Release the lock; with ``unlink``, first remove the file if the path still names
        it (while locked, so nobody can lock the dead inode). True when it was removed.
        Closing a closed file does nothing."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return False
        removed = False
        try:
            if unlink and os.path.samestat(os.fstat(fd), os.lstat(self.path)):
                os.unlink(self.path)
                removed = True
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        return removed


def acquire(
    path: str | os.PathLike[str], create: bool = True, wait: float = 0.0, tries: int = _TRIES,
    settle: float = _SETTLE,
) -> LockedFile:
    """Open and lock ``path``. A lock held by a live owner (its record names a live process)
    is retried for ``wait`` seconds, then raises :class:`LockBusy` carrying the holder's
    record; one held without such a record (a sweep, a probe, an owner about to write: see
    the module docstring) is retried until it is let go, for ``settle`` seconds at most
    (0: a sweep's own look, which takes nothing busy). Raises :class:`LockReplaced` after
    ``tries`` opens that each found another file at the path once locked (or, busy, already
    gone from it), :class:`LockUnsafe` when the path is not a plain file of ours, and
    ``OSError`` when the file cannot be opened (``ELOOP`` for a symlink;
    ``FileNotFoundError`` when it is missing and ``create`` is false)."""
    path = os.fspath(path)
    flags = (os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
             | (os.O_CREAT if create else 0))
    start = time.monotonic()
    opens = 0
    while opens < tries:
        fd = os.open(path, flags, 0o600)
        try:
            why = _unsafe(os.fstat(fd))
            if why is not None:
                raise LockUnsafe(path, why)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _read(fd)
            gone = not LockedFile(path, fd).is_current()  # its holder removed it: a sweep
            os.close(fd)
            if gone:
                opens += 1
                continue  # open the path again: a new file, or nothing (create=False)
            waited = time.monotonic() - start
            if waited < wait or (waited < settle and not _owned(text)):
                time.sleep(_BUSY_POLL)  # a back-off between lock attempts, nothing to wait on
                continue
            raise LockBusy(path, text) from None
        except BaseException:
            os.close(fd)
            raise
        held = LockedFile(path, fd)
        if held.is_current():
            return held
        os.close(fd)  # unlinked or replaced between open and lock: try the new one
        opens += 1
    raise LockReplaced(path)


def probe(path: str | os.PathLike[str]) -> str | None:
    """The content of ``path`` if someone holds its lock; None if nobody does or it cannot be
    opened. Takes only a shared lock for an instant, so it never blocks a holder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or device holds no record (and pread() on it fails)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
