"""Containment: one boundary holds every process of a fleet, so none outlives it.

As systemd's ``KillMode=control-group``: a worker's children, double-forked daemons, ``setsid``
children and workers that block every catchable signal all die with the fleet, even when the
supervisor is SIGKILLed (PDEATHSIG reaches only direct children, and only as a catchable
signal). Two kinds of boundary, behind one small interface (``kind``, :meth:`~Boundary.describe`,
:meth:`~Boundary.members`, :meth:`~Boundary.kill_rest`, :meth:`~Boundary.close`):

- :class:`Cgroup`: a cgroup v2 group ``multibus-<name>-<pid>`` made under the supervisor's own
  (root, or a delegated subtree). The supervisor moves itself into it (systemd keeps a
  service's main process in its group too), so every worker, the zygote and every descendant
  inherit it with no race; ``cgroup.kill`` kills the whole subtree at once, forks included.
- :class:`ProcScan`, where no group can be made: a marker every descendant inherits
  (``MULTIBUS_FLEET=<id>`` in the environment) and a scan of ``/proc/*/environ``, repeated
  until a pass finds nothing. It cannot catch a process that clears or replaces its initial
  environment (``execve`` with another ``envp``, e.g. ``env -i``), one in another pid namespace
  (a container), or one that forks faster than the scan kills; it reads only processes of the
  same user (or all, as root).

:class:`Containment` is the process's boundary plus its :class:`~multibus.guardian.Guardian`
(which kills the group when the supervisor dies): shared by every Supervisor running in the
process at the same time, made again by the next one. ``containment = "auto"`` (the default)
picks a cgroup where one can be made, else the scan; ``"cgroup"``, ``"scan"`` and ``"none"``
force one. Stdlib only: the guardian imports this module and nothing else of multibus.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable

__all__ = [
    "MARKER_ENV",
    "MODES",
    "Boundary",
    "Cgroup",
    "Containment",
    "ContainmentError",
    "ProcScan",
    "cgroup2_mount",
    "from_spec",
    "make_boundary",
]

MARKER_ENV = "MULTIBUS_FLEET"
MODES = ("auto", "cgroup", "scan", "none")
KILL_WAIT = 5.0  # s to wait for killed members to be gone
POLL = 0.005  # s between two looks while waiting


class ContainmentError(OSError):
    """The containment asked for cannot be set up (one line: what and the fix)."""


def _describe_pid(pid: int) -> str:
    """'1234 (sleep 1000)': a pid and its command line, for the log of what had to be killed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").strip().decode(errors="replace")
    except OSError:
        cmd = ""
    if not cmd:
        try:
            with open(f"/proc/{pid}/comm") as f:
                cmd = f"[{f.read().strip()}]"
        except OSError:
            cmd = "?"
    return f"{pid} ({cmd[:80]})"


class Boundary:
    """No containment (``containment = "none"``): workers' own process groups and PDEATHSIG only."""

    kind = "none"

    def describe(self) -> str:
        """What ``multibus status`` says about it."""
        return "none"

    def enter(self) -> None:
        """Make this process (and so everything it starts from now on) part of the boundary."""

    def leave(self) -> None:
        """Take this process out again (what it started stays in)."""

    def members(self) -> list[int]:
        """Pids of the processes inside, this one excepted."""
        return []

    def kill_rest(self, exclude: Iterable[int] = ()) -> list[str]:
        """SIGKILL every member but ``exclude`` and wait (bounded) until they are gone;
        return each killed one as 'pid (command line)'."""
        return []

    def close(self) -> None:
        """Remove the boundary (its members must be gone)."""

    def spec(self) -> list[str]:
        """Its description as strings, for a guardian that is exec'd (:func:`from_spec`)."""
        return [self.kind]

    def sweep(self) -> None:
        """What the guardian does once the supervisor is gone: kill every member, remove it."""


# -- cgroup v2 --------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid layout), or None."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return _unescape(left.split()[4])
    except OSError:
        return None
    return None


def own_cgroup(path: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup v2 path ('/' at the root), or None without v2."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


class Cgroup(Boundary):
    """A cgroup v2 group: ``path`` is its directory, ``home`` the one this process came from."""

    kind = "cgroup"

    def __init__(self, path: str, home: str) -> None:
        self.path = path
        self.home = home

    @classmethod
    def create(cls, name: str) -> Cgroup:
        """Make ``multibus-<name>-<pid>`` under this process's own group; OSError (saying why)
        if there is no cgroup v2 hierarchy, it is not writable, or it lacks ``cgroup.kill``
        (Linux < 5.14)."""
        mount, own = cgroup2_mount(), own_cgroup()
        if mount is None or own is None:
            raise OSError("no cgroup v2 hierarchy is mounted")
        home = os.path.normpath(os.path.join(mount, own.lstrip("/")))
        base = os.path.join(home, f"multibus-{name}-{os.getpid()}")
        path, n = base, 1
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:  # another fleet of this name in this process, earlier
                n += 1
                path = f"{base}.{n}"
        if not os.path.exists(os.path.join(path, "cgroup.kill")):
            os.rmdir(path)
            raise OSError(f"{path}: no cgroup.kill (needs Linux 5.14)")
        return cls(path, home)

    def describe(self) -> str:
        return f"cgroup {self.path}"

    @staticmethod
    def _move(group: str, pid: int) -> None:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def enter(self) -> None:
        self._move(self.path, os.getpid())

    def leave(self) -> None:
        if os.path.isdir(self.path) and os.getpid() in self._procs(self.path):
            self._move(self.home, os.getpid())

    def _groups(self) -> list[str]:
        """The group and its descendants, deepest first (the order they can be removed in)."""
        found = []
        for top, dirs, _files in os.walk(self.path):
            found.extend(os.path.join(top, d) for d in dirs)
        return sorted(found, key=lambda p: -p.count(os.sep)) + [self.path]

    @staticmethod
    def _procs(group: str) -> list[int]:
        try:
            with open(os.path.join(group, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def members(self) -> list[int]:
        me = os.getpid()
        return [p for g in self._groups() for p in self._procs(g) if p != me]

    def populated(self) -> bool:
        try:
            with open(os.path.join(self.path, "cgroup.events")) as f:
                return "populated 1" in f.read()
        except FileNotFoundError:
            return False

    def kill_rest(self, exclude: Iterable[int] = ()) -> list[str]:
        for pid in set(exclude) & set(self._procs(self.path)):
            self._move(self.home, pid)  # cgroup.kill spares no one: take them out first
        if not self.populated():
            return []
        killed = [_describe_pid(p) for p in self.members()]
        self._kill_and_wait()
        return killed

    def _kill_and_wait(self) -> None:
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
        except FileNotFoundError:
            return
        deadline = time.monotonic() + KILL_WAIT
        while self.populated() and time.monotonic() < deadline:
            time.sleep(POLL)

    def close(self) -> None:
        """Remove the group and its sub-groups (a nested fleet's); a member left makes
        it OSError (EBUSY)."""
        for g in self._groups():
            try:
                os.rmdir(g)
            except FileNotFoundError:
                pass

    def spec(self) -> list[str]:
        return [self.kind, self.path, self.home]

    def sweep(self) -> None:
        for _ in range(3):  # a member may slip in (a move) between the kill and the rmdir
            self._kill_and_wait()
            try:
                self.close()
                return
            except OSError:
                continue


# -- the /proc scan fallback ------------------------------------------------------------------

class ProcScan(Boundary):
    """A marker in the environment (``MULTIBUS_FLEET=<outer>:<id>``, nested fleets append
    their id) and a scan of ``/proc/<pid>/environ`` for it. See the module docstring for
    what it cannot catch."""

    kind = "scan"

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self._before: str | None = None

    def describe(self) -> str:
        return f"scan (marker {MARKER_ENV}={self.ident})"

    def enter(self) -> None:
        self._before = {k: os.environ.get(k) for k in (MARKER_ENV, "SPT_NOENV")}
        outer = self._before[MARKER_ENV]
        os.environ[MARKER_ENV] = f"{outer}:{self.ident}" if outer else self.ident
        # setproctitle would write a worker's title over its initial environment, the one
        # /proc/<pid>/environ shows: with SPT_NOENV it keeps to the argv area
        os.environ["SPT_NOENV"] = "1"

    def leave(self) -> None:
        for k, v in (self._before or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def members(self) -> list[int]:
        """The marked processes and, in the same pass, their descendants (a child that
        cleared its environment but whose parent is still alive and marked)."""
        key = MARKER_ENV.encode() + b"="
        ident = self.ident.encode()
        me = os.getpid()
        marked: set[int] = set()
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(pid)
            for var in env.split(b"\0"):
                if var.startswith(key) and ident in var[len(key):].split(b":"):
                    marked.add(pid)
                    break
        found, todo = set(marked), list(marked)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found and child != me:
                    found.add(child)
                    todo.append(child)
        return sorted(found)

    def kill_rest(self, exclude: Iterable[int] = ()) -> list[str]:
        """Kill every marked process, pass after pass until one finds nothing (a kill may
        race a fork); a killed process drops out of the scan once it is a zombie."""
        skip = set(exclude)
        killed: dict[int, str] = {}
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            left = [p for p in self.members() if p not in skip]
            if not left:
                break
            for pid in left:
                if pid not in killed:
                    killed[pid] = _describe_pid(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(POLL)
        return list(killed.values())

    def spec(self) -> list[str]:
        return [self.kind, self.ident]

    def sweep(self) -> None:
        self.kill_rest((os.getpid(),))


def from_spec(spec: list[str]) -> Boundary:
    """The boundary :meth:`Boundary.spec` described."""
    if spec[0] == "cgroup":
        return Cgroup(spec[1], spec[2])
    if spec[0] == "scan":
        return ProcScan(spec[1])
    return Boundary()


def make_boundary(mode: str, name: str) -> Boundary:
    """The boundary ``mode`` asks for; ContainmentError if ``"cgroup"`` cannot be made."""
    if mode not in MODES:
        raise ContainmentError(f"containment {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return Boundary()
    if mode in ("auto", "cgroup"):
        try:
            return Cgroup.create(name)
        except OSError as e:
            if mode == "cgroup":
                raise ContainmentError(
                    f"containment = 'cgroup': cannot make a cgroup v2 group ({e}); run as root "
                    "or in a delegated cgroup, or set containment = 'scan'") from e
    return ProcScan(f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**9:x}")


# -- the process's containment ----------------------------------------------------------------

class Containment:
    """The boundary this process is in while it runs fleets, and its guardian.

    :meth:`open` makes it (the boundary, then the guardian, then this process moves in) or,
    while one is open in this process, shares it; :meth:`release` by the last user kills what
    is left in it (after the workers' stop timeouts), takes this process out, removes it and
    ends the guardian. The guardian is forked when the process has one thread, else exec'd."""

    _current: Containment | None = None
    _lock = threading.Lock()

    def __init__(self, boundary: Boundary) -> None:
        self.boundary = boundary
        self.users = 0
        self.guardian: object | None = None  # a multibus.guardian.Guardian
        self._leaving: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return self.boundary.kind

    def describe(self) -> str:
        return self.boundary.describe()

    @property
    def guardian_pid(self) -> int | None:
        return getattr(self.guardian, "pid", None)

    @classmethod
    def describe_active(cls) -> str:
        """What this process's open containment is ('none' without one), for the status."""
        c = cls._current
        return "none" if c is None else c.describe()

    @classmethod
    def open(cls, mode: str, name: str) -> Containment:
        """This process's containment, made with ``mode`` for fleet ``name`` unless one is
        open already; ContainmentError if ``mode`` cannot be had."""
        from multibus.guardian import Guardian

        with cls._lock:
            c = cls._current
            if c is None:
                c = cls(make_boundary(mode, name))
                if c.kind != "none":
                    try:
                        c.guardian = Guardian.start(c.boundary)
                        c.boundary.enter()
                    except BaseException:
                        c._end()
                        raise
                cls._current = c
            c.users += 1
            return c

    def leave_early(self) -> None:
        """The only user is exiting and spawns nothing more: take this process out of its
        cgroup now, on a thread, while its workers stop. (A first cgroup move in a while
        waits for an RCU grace period, ~10 ms here; done at the end, it was that much on
        every exit.) Its workers stay in; :meth:`release` waits for the move."""
        if self.users == 1 and self.kind == "cgroup" and self._leaving is None:
            self._leaving = threading.Thread(target=self.boundary.leave, daemon=True,
                                             name="multibus-containment-leave")
            self._leaving.start()

    def release(self, log: Callable[[str, int], None] | None = None) -> None:
        """One user is done; the last one kills what is left (logged at WARNING: one line
        naming each process) and closes the boundary."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            if Containment._current is self:
                Containment._current = None
        if self._leaving is not None:
            self._leaving.join(10)
        killed = self.boundary.kill_rest((os.getpid(),))
        if killed and log is not None:
            log(f"containment: killed {len(killed)} process{'es' if len(killed) != 1 else ''} "
                f"left in {self.describe()}: {', '.join(killed)}", 30)
        self._end(log)

    def _end(self, log: Callable[[str, int], None] | None = None) -> None:
        try:
            self.boundary.leave()
            self.boundary.close()
        except OSError as e:  # still a member: the guardian sweeps once we are gone
            if log is not None:
                log(f"containment: cannot remove {self.describe()}: {e}", 40)
            return
        if self.guardian is not None:
            self.guardian.close()  # type: ignore[attr-defined]
