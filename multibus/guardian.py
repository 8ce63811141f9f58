"""The guardian: a small process that outlives its supervisor, then kills the fleet's boundary.

PDEATHSIG reaches only a supervisor's direct children, as a catchable signal, and a SIGKILLed
supervisor runs no exit code. So, once the boundary (:mod:`multibus.containment`) exists and
before the supervisor moves in, a guardian is started: outside the boundary, in its own session
(a terminal's Ctrl-C or hangup does not reach it), ignoring the signals that ask a process to
end, holding the read end of a pipe whose only write end the supervisor holds. When the pipe
closes (a clean exit and a SIGKILL alike) it runs the boundary's sweep (``cgroup.kill`` and
``rmdir``, or the ``/proc`` scan), then exits. It runs no user code and touches no ZeroMQ.

It is forked while the process has one thread (first thing in ``run_fleet``): cheap, and
everything it needs is bound before the fork. Otherwise (a Supervisor made inside a threaded
program or test) it is spawned as ``python -S -m multibus.guardian FD KIND ARGS...``, since a
fork of a threaded process may copy a lock another thread held.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

from multibus.containment import Boundary, from_spec

__all__ = ["Guardian", "main"]

# the signals that ask a process to end: the guardian ends when the supervisor does
IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _serve(fd: int, boundary: Boundary) -> None:
    """The guardian's life: wait for EOF on ``fd``, then sweep ``boundary``."""
    try:
        os.setsid()
    except OSError:
        pass  # spawned with setsid already
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    while os.read(fd, 512):
        pass
    boundary.sweep()


class Guardian:
    """Handle on a running guardian: its ``pid`` and the write end of its pipe."""

    def __init__(self, pid: int, wfd: int) -> None:
        self.pid = pid
        self._wfd: int | None = wfd

    @classmethod
    def start(cls, boundary: Boundary) -> Guardian:
        """Start the guardian of ``boundary`` (forked or spawned, see the module docstring)."""
        r, w = os.pipe()  # both close-on-exec: workers never hold the write end
        try:
            if _threads() == 1 and threading.current_thread() is threading.main_thread():
                pid = cls._fork(r, w, boundary)
            else:
                pid = cls._spawn(r, boundary)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return cls(pid, w)

    @staticmethod
    def _fork(r: int, w: int, boundary: Boundary) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:  # the child: nothing of the parent's but the pipe and stderr
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.closerange(3, r)
            os.closerange(r + 1, 1 << 20)
            _serve(r, boundary)
        except BaseException as e:  # noqa: BLE001 - report, never return into the parent's code
            os.write(2, f"multibus guardian: {e!r}\n".encode())
            code = 1
        os._exit(code)

    @staticmethod
    def _spawn(r: int, boundary: Boundary) -> int:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.set_inheritable(r, True)
        null = os.devnull
        return os.posix_spawn(
            sys.executable, [sys.executable, "-S", "-m", "multibus.guardian", str(r),
                             *boundary.spec()],
            {"PYTHONPATH": here},  # nothing else: no marker, no start-up hooks
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0)],
            setsid=True, setsigmask=(),
            setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE),
        )

    def close(self, timeout: float = 10.0) -> bool:
        """Close the pipe (the guardian sweeps and exits) and reap it; False if it was
        still running ``timeout`` s later (it is left to finish on its own)."""
        if self._wfd is None:
            return True
        os.close(self._wfd)
        self._wfd = None
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            pidfd = None
        try:
            if pidfd is not None:
                select.select([pidfd], [], [], timeout)
            return os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
        except ChildProcessError:
            return True  # reaped by someone else
        finally:
            if pidfd is not None:
                os.close(pidfd)


def main(argv: list[str] | None = None) -> None:
    """``python -m multibus.guardian FD KIND ARGS...``: the spawned guardian."""
    args = sys.argv[1:] if argv is None else argv
    _serve(int(args[0]), from_spec(args[1:]))


if __name__ == "__main__":
    main()
