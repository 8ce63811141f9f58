"""Child processes of a supervisor: spawn by exec, own every wait, read every output line.

One long-lived thread (:class:`ProcessManager`) does all of it, because:

- ``PR_SET_PDEATHSIG`` in a child fires when the *thread* that spawned it exits, so spawning
  must happen on a thread that lives as long as the supervisor;
- a generic ``waitpid(-1)`` steals exit codes from ``Popen.wait()``: here one component owns
  every wait. Each known child has a pidfd in the thread's poller (death is noticed at once,
  no polling tick); its code is written back into ``Popen.returncode`` so nothing else waits.
  Orphaned grandchildren adopted through ``PR_SET_CHILD_SUBREAPER`` are found by scanning
  ``/proc/self/task/*/children`` (on SIGCHLD and whenever a worker exits) and reaped too,
  except children in the supervisor's own process group (those belong to the application);
- stdout/stderr are read until EOF and delivered a whole line at a time, so a worker's last
  lines are never lost and lines from different workers never interleave; the lines of one
  Python traceback on stderr are delivered together, as one record (:class:`_Traceback`).

Idle, the thread sleeps in ``select`` with no timeout: zero wake-ups.
"""

from __future__ import annotations

import ctypes
import glob
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from multibus.child import Child, signal_group
from multibus.wakeup import CallQueue, Handle, Wakeup

__all__ = ["ProcessManager", "set_child_subreaper"]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MAX_LINE = 64 * 1024  # a longer line is delivered in pieces of this size
READ_SIZE = 64 * 1024
SCAN_GAP = 0.02  # s between two scans for adopted orphans while exits keep coming
TRACEBACK_WAIT = 0.1  # s a traceback's next line may take before it is delivered as it is


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}): {os.strerror(err)}")


def set_child_subreaper() -> None:
    """Make orphaned descendants children of this process (so it can reap them)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _decode(data: bytes) -> list[str]:
    """The lines of ``data`` (split at "\\n", which never occurs inside a UTF-8 character):
    decoded once, invalid bytes replaced, without a trailing "\\r" each."""
    lines = data.decode("utf-8", "replace").split("\n")
    return [line.rstrip("\r") for line in lines] if b"\r" in data else lines


class _Stream:
    __slots__ = ("child", "name", "fd", "file", "buf", "tb")

    def __init__(self, child: Child, name: str, file: Any) -> None:
        self.child = child
        self.name = name
        self.file = file
        self.fd = file.fileno()
        self.buf = b""
        self.tb: _Traceback | None = None  # stderr: a traceback being collected
        os.set_blocking(self.fd, False)


_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class _Traceback:
    """The lines of one Python traceback (chained ones included), collected so that they
    are delivered as one record instead of one per line. It ends at the first line that
    cannot continue it, at EOF, or ``TRACEBACK_WAIT`` s after its last line."""

    __slots__ = ("lines", "ended", "timer")

    def __init__(self, first: str) -> None:
        self.lines = [first]
        self.ended = False  # the exception line ('ValueError: ...') has come
        self.timer: Handle | None = None

    @staticmethod
    def starts(line: str) -> bool:
        return line.startswith("Traceback (most recent call last):")

    def add(self, line: str) -> bool:
        """Take ``line`` if it continues the traceback."""
        if not line or line[0] in " \t" or line.startswith(_CHAINED):
            pass  # frames, source lines, carets, the blank lines and text between chained ones
        elif self.starts(line):
            last = next((x for x in reversed(self.lines) if x), "")
            if not last.startswith(_CHAINED):
                return False
            self.ended = False
        elif self.ended:
            return False
        else:
            self.ended = True  # the exception line itself
        self.lines.append(line)
        return True

    def text(self) -> str:
        return "\n".join(self.lines).rstrip("\n")


LineCallback = Callable[[Child, str, str], None]
LinesCallback = Callable[[Child, str, list[str]], None]
ExitCallback = Callable[[Child], None]


class ProcessManager:
    """The thread that spawns children, waits for them and reads their output.

    ``on_line(child, stream, line)`` gets each output line ('stdout'/'stderr', without the
    newline; the lines of one traceback on stderr come as one, joined by newlines);
    ``on_exit(child)`` runs once a child is reaped. Both run in the manager thread, as do
    callables passed to :meth:`call_soon` / :meth:`call_later`. ``on_lines(child, stream,
    lines)``, if given, replaces ``on_line``: the lines of one read come in one call (in
    order; a traceback is one of them), so a flood costs one call per chunk, not per line.
    """

    def __init__(
        self,
        on_line: LineCallback | None = None,
        on_exit: ExitCallback | None = None,
        on_adopted: Callable[[int, int], None] | None = None,
        keep_lines: int = 20,
        name: str = "multibus-procs",
        on_lines: LinesCallback | None = None,
    ) -> None:
        self.on_line = on_line
        self.on_lines = on_lines
        self.on_exit = on_exit
        self.on_adopted = on_adopted  # (pid, returncode) of a reaped adopted orphan
        self.keep_lines = keep_lines
        self.children: dict[int, Child] = {}  # pid -> live (unreaped) child
        self.adopted: dict[int, int] = {}  # pid -> pidfd of an adopted orphan
        self.foreign: set[int] = set()  # our children that are not orphans (the guardian)
        self._sel = selectors.DefaultSelector()
        self._wakeup = Wakeup()
        self._sel.register(self._wakeup.fileno(), selectors.EVENT_READ, ("wake", None))
        self._calls = CallQueue(wake=self._wake_from_outside, on_error=self._call_failed)
        self._closing = False
        self._scan_due = False  # look for adopted orphans (at most every SCAN_GAP s)
        self._next_scan = 0.0
        self._pgrp = os.getpgrp()
        self._old_sigchld: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- public, any thread ---------------------------------------------------------------

    def start(self) -> ProcessManager:
        """Start the thread; install a SIGCHLD wake-up when called from the main thread."""
        if threading.current_thread() is threading.main_thread():
            try:
                self._old_sigchld = signal.signal(signal.SIGCHLD, self._on_sigchld)
            except (ValueError, OSError):
                self._old_sigchld = None
        self._thread.start()
        return self

    def _on_sigchld(self, signum: int, frame: Any) -> None:
        self.wake()

    def wake(self) -> None:
        self._wakeup.wake()

    def _wake_from_outside(self) -> None:
        # a call queued by the thread itself is run before it sleeps again: no wake-up
        # (a wake-up would also make it scan for adopted orphans)
        if not self.in_thread():
            self._wakeup.wake()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_later(self, delay: float, func: Callable[[], Any]) -> Handle:
        """Run ``func()`` in the manager thread after ``delay`` s; ``.cancel()`` the handle
        to keep it from running."""
        return self._calls.call_later(delay, func)

    def call_soon(self, func: Callable[[], Any]) -> Handle:
        return self._calls.call_soon(func)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pass_fds: Iterable[int] = (),
        umask: int = -1,
    ) -> Child:
        """Exec ``argv`` from the manager thread in its own process group; return its Child.

        stdin is /dev/null; stdout and stderr are pipes read by the manager thread.
        ``umask`` >= 0 is the child's umask (Popen's ``umask=``).
        """
        if self.in_thread():
            return self._spawn(name, argv, env, cwd, tuple(pass_fds), umask)
        fut: Future[Child] = Future()

        def do() -> None:
            try:
                fut.set_result(self._spawn(name, argv, env, cwd, tuple(pass_fds), umask))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.call_soon(do)
        return fut.result()

    def register(self, name: str, proc: Any) -> Child:
        """Own a process started elsewhere (manager thread only): ``proc`` is Popen-like
        (``pid``, ``stdout``/``stderr`` pipe files, ``returncode``) and must be our child
        (re-parented to us as subreaper, say), leader of its own process group."""
        assert self.in_thread(), "register() runs in the manager thread"
        return self._register(name, proc)

    def close(self, timeout: float = 5.0) -> None:
        """Kill and reap remaining adopted orphans, then stop the thread.

        Known children must already be gone (see :func:`stop_children`); any still alive are
        SIGKILLed with their process group so nothing is left behind.
        """
        if not self._thread.is_alive():
            return
        done = threading.Event()

        def finish() -> None:
            self._closing = True
            for child in list(self.children.values()):
                signal_group(child.pgid, signal.SIGKILL)
            self._scan_adopted()
            for pid in list(self.adopted):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            done.set()

        self.call_soon(finish)
        done.wait(timeout)
        self._thread.join(timeout)
        if self._old_sigchld is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGCHLD, self._old_sigchld)
            except (ValueError, OSError):
                pass

    # -- the thread -----------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | None,
        pass_fds: tuple[int, ...],
        umask: int = -1,
    ) -> Child:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=cwd,
            close_fds=True,
            pass_fds=pass_fds,
            process_group=0,
            umask=umask,
        )
        return self._register(name, popen)

    def _register(self, name: str, popen: Any) -> Child:
        child = Child(name=name, popen=popen)
        pidfd = os.pidfd_open(popen.pid)
        child.data["_pidfd"] = pidfd
        child.data["_streams"] = 2
        self.children[popen.pid] = child
        self._sel.register(pidfd, selectors.EVENT_READ, ("exit", child))
        for sname, f in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            stream = _Stream(child, sname, f)
            self._sel.register(stream.fd, selectors.EVENT_READ, ("out", stream))
        return child

    def _run(self) -> None:
        while True:
            timeout = self._calls.timeout()
            if self._scan_due:
                if self._closing or time.monotonic() >= self._next_scan:
                    self._scan_adopted()
                else:
                    left = self._next_scan - time.monotonic()
                    timeout = left if timeout is None else min(timeout, left)
            if self._closing and not self.children and not self.adopted:
                break
            if self._closing and timeout is None:
                timeout = 0.05  # closing: bounded waits while the last children die
            for key, _ in self._sel.select(timeout):
                kind, obj = key.data
                if kind == "out":
                    self._read(obj)
                elif kind == "exit":
                    self._reap(obj)
                elif kind == "adopted":
                    self._reap_adopted(obj)
                else:
                    self._wakeup.drain()
                    self._scan_due = True  # SIGCHLD may be an orphan's
            self._calls.run_due()
        self._sel.close()
        self._wakeup.close()

    def _call_failed(self, func: Callable[[], Any], exc: BaseException) -> None:
        # never let a callback kill the reaper
        self._emit_internal(f"error in scheduled call {func!r}: {exc!r}")

    def _emit_internal(self, msg: str) -> None:
        try:
            import sys

            print(f"multibus.procs: {msg}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001
            pass

    def _read(self, stream: _Stream) -> None:
        try:
            data = os.read(stream.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            buf = stream.buf + data
            cut = buf.rfind(b"\n")
            rest = buf[cut + 1:]
            lines = _decode(buf[:cut]) if cut >= 0 else []
            while len(rest) > MAX_LINE:
                lines += _decode(rest[:MAX_LINE])
                rest = rest[MAX_LINE:]
            stream.buf = rest
            if lines:
                self._lines(stream, lines)
            return
        # EOF: deliver the unterminated tail, close, maybe finish the child
        if stream.buf:
            self._lines(stream, _decode(stream.buf))
            stream.buf = b""
        self._end_traceback(stream)
        self._sel.unregister(stream.fd)
        stream.file.close()
        child = stream.child
        child.data["_streams"] -= 1
        if child.data["_streams"] == 0:
            child.drained.set()

    def _lines(self, stream: _Stream, lines: list[str]) -> None:
        """Keep the last few of ``lines`` and deliver them; on stderr, the lines of a
        traceback are gathered into one (delivered when it ends)."""
        child = stream.child
        keep = self.keep_lines
        if keep:
            last = child.last_lines
            last += lines[-keep:]
            if len(last) > keep:
                del last[:len(last) - keep]
        if stream.name != "stderr" or (
                stream.tb is None and not any(map(_Traceback.starts, lines))):
            self._deliver(stream, lines)
            return
        plain: list[str] = []  # lines since the last traceback, not delivered yet
        for line in lines:
            tb = stream.tb
            if tb is not None:
                if tb.add(line):
                    self._wait_traceback(stream, tb)
                    continue
                self._end_traceback(stream)
            if _Traceback.starts(line):
                if plain:
                    self._deliver(stream, plain)
                    plain = []
                stream.tb = tb = _Traceback(line)
                self._wait_traceback(stream, tb)
                continue
            plain.append(line)
        if plain:
            self._deliver(stream, plain)

    def _wait_traceback(self, stream: _Stream, tb: _Traceback) -> None:
        """(Re)arm the timer that delivers ``tb`` if no line continues it soon."""
        if tb.timer is not None:
            tb.timer.cancel()
        tb.timer = self.call_later(TRACEBACK_WAIT, lambda: self._end_traceback(stream))

    def _end_traceback(self, stream: _Stream) -> None:
        tb, stream.tb = stream.tb, None
        if tb is not None:
            if tb.timer is not None:
                tb.timer.cancel()
            self._deliver(stream, [tb.text()])

    def _deliver(self, stream: _Stream, lines: list[str]) -> None:
        child = stream.child
        calls = [(self.on_lines, lines)] if self.on_lines is not None else [
            (self.on_line, line) for line in lines] if self.on_line is not None else []
        for call, arg in calls:
            try:
                call(child, stream.name, arg)
            except Exception as e:  # noqa: BLE001
                self._emit_internal(f"error in line callback: {e!r}")

    def _reap(self, child: Child) -> None:
        pidfd = child.data["_pidfd"]
        # Signal what is left of its process group while the zombie leader still holds the
        # group id (after reaping, the id could be reused by an unrelated group).
        if child.data.get("term_group_on_exit", True):
            signal_group(child.pgid, signal.SIGTERM)
        try:
            res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            res = None
            rc = -signal.SIGKILL  # reaped elsewhere (must not happen): record as lost
        else:
            if res is None:
                return  # spurious wake-up
            rc = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        self._sel.unregister(pidfd)
        os.close(pidfd)
        child.returncode = rc
        child.ended = time.monotonic()
        child.popen.returncode = rc  # so Popen never waits (and never steals a reused pid)
        self.children.pop(child.pid, None)
        # whatever is left of the worker's process group is now orphaned, and ours
        self._scan_due = True
        child.exited.set()
        if self.on_exit is not None:
            try:
                self.on_exit(child)
            except Exception as e:  # noqa: BLE001
                self._emit_internal(f"error in exit callback: {e!r}")

    def _scan_adopted(self) -> None:
        """Find orphaned descendants re-parented to us; reap the dead, watch the living.

        Reads a file per thread and checks each child: run once per burst of exits (a fleet
        of 50 stopping), not once per exit."""
        self._scan_due = False
        self._next_scan = time.monotonic() + SCAN_GAP
        pids: set[int] = set()
        for path in glob.glob("/proc/self/task/*/children"):
            try:
                with open(path) as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                continue
        for pid in pids:
            if pid in self.children or pid in self.adopted or pid in self.foreign:
                continue
            try:
                if os.getpgid(pid) == self._pgrp:
                    continue  # the application's own child (same group as us): not ours
            except ProcessLookupError:
                continue
            try:
                res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                continue
            if res is not None:
                self._adopted_done(pid, res)
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            self.adopted[pid] = pidfd
            self._sel.register(pidfd, selectors.EVENT_READ, ("adopted", pid))
            if self._closing:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _reap_adopted(self, pid: int) -> None:
        pidfd = self.adopted[pid]
        try:
            res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            res = None
        else:
            if res is None:
                return
        self._sel.unregister(pidfd)
        os.close(pidfd)
        del self.adopted[pid]
        if res is not None:
            self._adopted_done(pid, res)
        self._scan_due = True  # its own orphans are ours now

    def _adopted_done(self, pid: int, res: Any) -> None:
        rc = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        if self.on_adopted is not None:
            try:
                self.on_adopted(pid, rc)
            except Exception as e:  # noqa: BLE001
                self._emit_internal(f"error in adopted callback: {e!r}")
