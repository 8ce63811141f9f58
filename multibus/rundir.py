"""The private runtime dir, and the names claimed in it.

Every hub (and so every supervisor) called ``NAME`` lives in one private directory
(``$XDG_RUNTIME_DIR/multibus`` or ``/tmp/multibus-<uid>``, 0700, ours, not a symlink) as:

* ``NAME.lock``: the name lock, a :mod:`multibus.lockfile` held for as long as the hub runs,
  with its pid in it. One hub per name: a second ``bind()`` on an ipc path silently steals it
  from a live hub, so nobody binds a name's sockets without holding its lock;
* ``NAME.control``, ``NAME.down``, ``NAME.up``: the hub's ipc sockets (:data:`HUB_SOCKETS`);
* ``NAME.ctl``: a supervisor's control socket (:func:`control_path`);
* ``NAME.pid``: a supervisor's default PID file (:func:`pid_path`).

A root supervisor whose workers run as another user also binds its hub in the *shared* dir
(:func:`shared_dir`: root's, 0711, so others may pass through but not list or write it) as
``NAME.u<UID>.control``/``.down``/``.up``, each socket owned by that user and 0600.

A killed hub leaves its files behind but not its lock (the kernel drops it), so files whose
lock nobody holds are stale and :func:`sweep_stale` removes them. Claims work on *base* paths
(``DIR/NAME``), so an explicit ipc address outside the runtime dir is claimed the same way.
Knows nothing of ZeroMQ: the transport builds its endpoints on top of this.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from multibus import lockfile
from multibus.names import check_name

__all__ = [
    "HUB_SOCKETS",
    "HubNameInUse",
    "RunDirError",
    "UnsafeRuntimeDir",
    "claim",
    "control_path",
    "is_held",
    "name_owner",
    "name_path",
    "owner",
    "pid_path",
    "release",
    "remove_sockets",
    "running_supervisors",
    "runtime_dir",
    "shared_dir",
    "sweep_stale",
]

HUB_SOCKETS = ("control", "down", "up")  # a hub's ipc sockets: BASE.control, BASE.down, BASE.up
_CLAIM_WAIT = 0.035  # a held lock may be only sweep_stale() removing a dead hub's files


class RunDirError(Exception):
    """Base class for the errors of this module."""


class UnsafeRuntimeDir(RunDirError, PermissionError):
    """The runtime dir could be read or hijacked by another user."""


class HubNameInUse(RunDirError):
    """A live hub already owns this name; ``pid`` is its pid when known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


# --------------------------------------------------------------------------- the directory


def _usable_base(base: str, uid: int) -> bool:
    """$XDG_RUNTIME_DIR is only used when it is absolute, ours, a dir we can write, and not
    writable by others; otherwise we fall back to /tmp/multibus-<uid>."""
    if not os.path.isabs(base):
        return False
    try:
        st = os.stat(base)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
        and not st.st_mode & 0o022
        and os.access(base, os.W_OK | os.X_OK)
    )


def _runtime_path() -> Path:
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and _usable_base(xdg, uid):
        return Path(xdg) / "multibus"
    return Path("/tmp") / f"multibus-{uid}"


def _unsafe(path: Path, why: str, fix: str) -> UnsafeRuntimeDir:
    return UnsafeRuntimeDir(f"unsafe runtime dir {path}: {why}; {fix}")


def _check_private_dir(path: Path, st: os.stat_result) -> None:
    uid = os.getuid()
    remove = f"remove it (rm -r {path}) or set XDG_RUNTIME_DIR to a private directory"
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(path, "it is a symlink", remove)
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "it is not a directory", remove)
    if st.st_uid != uid:
        raise _unsafe(path, f"owned by uid {st.st_uid}, not by us (uid {uid})", remove)
    if stat.S_IMODE(st.st_mode) & 0o077:
        mode = oct(stat.S_IMODE(st.st_mode))
        raise _unsafe(path, f"mode {mode} lets other users in", f"run `chmod 700 {path}`")


def runtime_dir(create: bool = True) -> Path:
    """The private dir for ipc sockets: ``$XDG_RUNTIME_DIR/multibus`` if that base is usable,
    else ``/tmp/multibus-<uid>``. Created 0700 when missing (``FileNotFoundError`` instead
    when not ``create``); refused (``UnsafeRuntimeDir``) when it is a symlink, not a dir, not
    ours, or open to others: anyone who can enter it can talk to our hubs or put their own
    socket in our place."""
    path = _runtime_path()
    created = False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:  # lost a race; check whoever won below
            pass
        st = os.lstat(path)
    if not created:
        _check_private_dir(path, st)
    # Re-check through an O_NOFOLLOW fd so nothing can be swapped in between check and use.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.lstat(path)
            _check_private_dir(path, st)
        raise
    try:
        if created:
            os.fchmod(fd, 0o700)  # undo a restrictive umask; we just made it, so it's ours
        _check_private_dir(path, os.fstat(fd))
    finally:
        os.close(fd)
    return path


def shared_dir() -> Path:
    """The directory where a root supervisor's hub also listens for workers that run as
    another user (they cannot enter the private runtime dir): ``/run/multibus-shared``, or
    ``/tmp/multibus-<uid>-shared`` without a writable /run. Created 0711 (others may pass
    through to a socket they own, not list or write); refused (``UnsafeRuntimeDir``) when it
    is a symlink, not a dir, not ours, or writable by others."""
    uid = os.getuid()
    base = "/run" if os.access("/run", os.W_OK | os.X_OK) else "/tmp"
    path = Path(base) / ("multibus-shared" if base == "/run" else f"multibus-{uid}-shared")
    try:
        os.mkdir(path, 0o711)
        os.chmod(path, 0o711)  # undo a restrictive umask; we just made it
    except FileExistsError:
        pass
    st = os.lstat(path)
    remove = f"remove it (rm -r {path})"
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, "it is not a directory (or a symlink)", remove)
    if st.st_uid != uid:
        raise _unsafe(path, f"owned by uid {st.st_uid}, not by us (uid {uid})", remove)
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise _unsafe(path, f"mode {oct(stat.S_IMODE(st.st_mode))} lets others write in it",
                      f"run `chmod 711 {path}`")
    return path


def name_path(name: str, create: bool = True) -> Path:
    """``<runtime dir>/<name>``: the base path of the files of the hub called ``name``
    (``ValueError`` for an invalid name)."""
    return runtime_dir(create) / check_name(name, "hub name")


def control_path(name: str, create: bool = False) -> Path:
    """``<runtime dir>/<name>.ctl``: the control socket of the supervisor called ``name``."""
    return Path(f"{name_path(name, create)}.ctl")


def pid_path(name: str, create: bool = True) -> Path:
    """``<runtime dir>/<name>.pid``: the default PID file of the supervisor called ``name``."""
    return Path(f"{name_path(name, create)}.pid")


# --------------------------------------------------------------------------- name locks

_held: dict[str, lockfile.LockedFile] = {}  # lock path -> the lock this process holds
_held_guard = threading.Lock()


def _lock_path(base: str | os.PathLike[str]) -> str:
    return f"{os.fspath(base)}.lock"


def _unlink_socket(path: str | os.PathLike[str]) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove_sockets(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Unlink each path that is a socket (anything else, or nothing, is left alone)."""
    for path in paths:
        _unlink_socket(path)


def is_held(base: str | os.PathLike[str]) -> bool:
    """True when this process holds the lock of ``base``."""
    with _held_guard:
        return _lock_path(base) in _held


def claim(base: str | os.PathLike[str], sockets: Iterable[str | os.PathLike[str]] = (),
          what: str | None = None) -> None:
    """Take the name lock ``BASE.lock`` for this process, then remove the stale ``sockets``
    a dead holder left. Raises ``HubNameInUse`` (``what`` names the claim in the message)
    when a live process holds it, this one included; ``OSError`` when the lock file cannot
    be opened (``FileNotFoundError``: its directory is gone)."""
    path = _lock_path(base)
    what = what or f"hub name {os.fspath(base)}"
    with _held_guard:
        if path in _held:
            pid = os.getpid()
            raise HubNameInUse(
                f"{what} is already in use by this process (pid {pid}, lock {path}); "
                "remove_ipc() it first or choose another name", pid)
        try:
            held = lockfile.acquire(path, wait=_CLAIM_WAIT)
        except lockfile.LockBusy as busy:
            pid = lockfile.parse_record(busy.text)[0]
            who = f"pid {pid}" if pid else "another process"
            raise HubNameInUse(
                f"{what} is in use by {who} (lock {path}); stop that hub or choose another "
                "name", pid) from None
        except lockfile.LockReplaced:
            raise HubNameInUse(f"could not lock {path}: it keeps being replaced; retry") from None
        try:
            held.write(f"{os.getpid()}\n")
        except BaseException:
            held.close()
            raise
        _held[path] = held
    for sock in sockets:
        _unlink_socket(sock)


def release(base: str | os.PathLike[str], sockets: Iterable[str | os.PathLike[str]] = ()) -> bool:
    """Remove the ``sockets`` and the lock of ``base``; only when this process holds the lock
    or nobody does, so a live hub's sockets are never pulled from under it. True when the
    files were removed."""
    path = _lock_path(base)
    if not is_held(base):
        try:
            claim(base)  # refuses if a live hub holds it
        except (HubNameInUse, FileNotFoundError):  # or the directory is gone: nothing to do
            return False
    for sock in sockets:
        _unlink_socket(sock)
    with _held_guard:
        held = _held.pop(path, None)
        if held is not None:
            held.close(unlink=True)
    return True


def owner(base: str | os.PathLike[str]) -> int | None:
    """Pid of the live process holding the lock of ``base`` (-1 when its pid is unreadable),
    else None."""
    path = _lock_path(base)
    with _held_guard:
        if path in _held:
            return os.getpid()
    text = lockfile.probe(path)
    if text is None:
        return None
    return lockfile.parse_record(text)[0] or -1


def name_owner(name: str) -> int | None:
    """Pid of the live hub called ``name`` in the runtime dir; None when there is none (no
    runtime dir, or not a valid name)."""
    try:
        return owner(name_path(name, create=False))
    except (OSError, ValueError):
        return None


def sweep_stale(directory: str | os.PathLike[str] | None = None) -> int:
    """Remove the files of every hub and supervisor in ``directory`` (default
    ``runtime_dir()``) whose owner is gone (a killed one never released them); returns how
    many names and PID files were removed. Only provably stale files are touched:

    * ``NAME.lock`` nobody holds: with its sockets (``HUB_SOCKETS`` and ``NAME.ctl``);
    * ``NAME.ctl`` with no lock file at all: removed under a fresh claim of the name, so a
      supervisor starting meanwhile keeps its socket;
    * ``NAME.pid`` whose own lock nobody holds (a PID file is held for its owner's life).

    Live owners (this process included) and files that are not plain files of ours are safe."""
    directory = Path(directory) if directory is not None else runtime_dir()
    removed = 0
    with _held_guard:
        held = set(_held)
    for lock in directory.glob("*.lock"):
        if str(lock) in held:
            continue
        try:
            stale = lockfile.acquire(lock, create=False, tries=1, settle=0)
        except (lockfile.LockError, OSError):  # a live owner, replaced meanwhile, or gone
            continue
        base = str(lock).removesuffix(".lock")
        try:
            for suffix in (*HUB_SOCKETS, "ctl"):
                _unlink_socket(f"{base}.{suffix}")
            # unlinked while still locked: a newcomer that opened it re-checks and retries
            removed += stale.close(unlink=True)
        except OSError:  # leave the rest alone
            stale.close()
    for ctl in directory.glob("*.ctl"):
        base = str(ctl).removesuffix(".ctl")
        if not os.path.lexists(_lock_path(base)) and stat.S_ISSOCK(_lmode(ctl)):
            removed += release(base, [ctl])
    for pid in directory.glob("*.pid"):
        try:
            stale = lockfile.acquire(pid, create=False, tries=1, settle=0)
        except (lockfile.LockError, OSError):  # held by its live owner (maybe us), or unsafe
            continue
        removed += stale.close(unlink=True)
    return removed


def _lmode(path: str | os.PathLike[str]) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def running_supervisors() -> dict[str, int]:
    """name -> pid of every live supervisor with a control socket in the runtime dir."""
    try:
        directory = runtime_dir(create=False)
    except FileNotFoundError:
        return {}
    found = {}
    for path in sorted(directory.glob("*.ctl")):
        pid = name_owner(path.stem)
        if pid:
            found[path.stem] = pid
    return found
