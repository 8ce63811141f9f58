"""Daemonizer: detach with a double fork; the original parent's exit status says if it started.

CherryPy's parent exits 0 right after the first fork, so a daemon that fails in a later start
listener still reports success. Here the original parent waits on a pipe: the daemon writes
``ok <pid>`` once the bus logs "Bus STARTED", or the error text if the bus stops during startup;
the parent then exits 0, or prints the error and exits 1 (EOF without a report means the daemon
died during startup).

Fork hazards: fork() copies only the calling thread, and a ZeroMQ context or socket does not
survive it. Subscribe the Daemonizer (priority 65, before PIDFile's 70) and start the bus before
anything creates threads or a zmq context (the Bridge plugin, Monitors: they start at priority
>= 70, after the fork). Threads already running are listed in a warning. SignalHandler's
wake-up thread is fork-aware and not counted.

The daemon keeps the working directory and umask (use DropPrivileges for the umask); stdio is
redirected to ``stdin``/``stdout``/``stderr`` (default /dev/null).
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from typing import Any

from .base import SimplePlugin

_MAX_REPORT = 64 * 1024


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    for ref in list(getattr(logging, "_handlerList", ())):
        handler = ref()
        if handler is not None:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - best effort before fork
                pass


class Daemonizer(SimplePlugin):
    """Daemonize on 'start' (double fork, setsid) and report the outcome to the original parent."""

    def __init__(self, bus: Any, stdin: str = "/dev/null", stdout: str = "/dev/null",
                 stderr: str = "/dev/null", startup_timeout: float | None = None) -> None:
        super().__init__(bus)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.startup_timeout = startup_timeout
        self.finalized = False
        self._report_fd: int | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Fork twice; the original parent waits for the daemon's report and exits."""
        if self.finalized:
            self.bus.log("Already daemonized.")
            return
        others = [t.name for t in threading.enumerate()
                  if t is not threading.current_thread()
                  and not getattr(t, "_multibus_fork_safe", False)]
        if others:
            self.bus.log(f"Daemonizing with {len(others)} other threads running {others}: they "
                         "do not survive fork(); subscribe Daemonizer before starting them.", 30)
        r, w = os.pipe2(os.O_CLOEXEC)
        _flush_all()
        pid = os.fork()
        if pid > 0:
            os.close(w)
            self._original_parent(r, pid)  # never returns
        os.close(r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)  # first child: the daemon is re-parented, never a session leader
        self._redirect_stdio()
        self._report_fd = w
        self.bus.subscribe("log", self._watch_log, priority=0)
        self.finalized = True
        self.bus.log(f"Daemonized to PID: {os.getpid()}")

    start.priority = 65  # type: ignore[attr-defined]

    # -- daemon side ---------------------------------------------------------------------

    def _redirect_stdio(self) -> None:
        for fd, path, mode in ((0, self.stdin, os.O_RDONLY),
                               (1, self.stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                               (2, self.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
            new = os.open(path, mode | os.O_CLOEXEC, 0o600)
            os.dup2(new, fd)
            os.close(new)

    def _watch_log(self, msg: str, level: int = 20) -> None:
        """'log' listener in the daemon: report the startup outcome once."""
        if self._report_fd is None:
            return
        if msg == "Bus STARTED":
            self._report(f"ok {os.getpid()}")
        elif isinstance(level, int) and level >= 40 and self._error is None:
            self._error = msg
        elif msg in ("Bus STOPPING", "Bus EXITING"):
            self._report(self._error or "the bus stopped during startup")

    def _report(self, text: str) -> None:
        fd, self._report_fd = self._report_fd, None
        if fd is None:
            return
        try:
            os.write(fd, text.encode("utf-8", "replace")[:_MAX_REPORT])
        except OSError:
            pass  # the original parent is gone: nobody to tell
        finally:
            os.close(fd)
        self._error = None

    # -- original parent side ------------------------------------------------------------

    def _read_report(self, r: int) -> str | None:
        chunks: list[bytes] = []
        deadline = None if self.startup_timeout is None else time.monotonic() + self.startup_timeout
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    return None
            data = os.read(r, 65536)
            if not data:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(data)

    def _original_parent(self, r: int, child: int) -> None:
        try:
            try:
                os.waitpid(child, 0)  # the first child exits right after the second fork
            except ChildProcessError:
                pass  # SIGCHLD ignored: the kernel reaped it
            report = self._read_report(r)
        except KeyboardInterrupt:
            report = "interrupted while waiting for the daemon to start"
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        if report is not None and report.startswith("ok "):
            self.bus.log(f"Daemon started as PID {report[3:]}.")
            status = 0
        else:
            if report is None:
                summary = (f"the daemon did not report within {self.startup_timeout}s "
                           "(it may still be starting); check its log")
            elif not report:
                summary = "the daemon exited during startup without a report; check its log"
            else:
                lines = [ln for ln in report.strip().splitlines() if ln.strip()]
                summary = lines[-1] if lines else report
            try:
                sys.stderr.write(f"{prog}: daemon failed to start: {summary}\n")
                if report and report.strip() != summary:
                    sys.stderr.write(report.rstrip() + "\n")
            except (OSError, ValueError):
                pass
            status = 1
        # The original parent must not go on running the bus the daemon now owns: exit without
        # atexit handlers or bus listeners (as CherryPy does), after flushing what it printed.
        _flush_all()
        os._exit(status)
