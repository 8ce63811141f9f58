"""Worker targets that try to outlive their fleet (issue 14 part 1), for test_containment.

Each, once its bus is STARTED, writes ``$MB_ESCAPE_DIR/<pid>`` (atomically): its own pid and
those of every process it made, one a line, so a test knows what must be gone.

- ``child``: ``subprocess.Popen(["sleep", "1000"])``, as in the issue;
- ``setsid``: a child in its own session;
- ``daemon``: a double-forked daemon (fork, setsid, fork, exec; the middle one exits);
- ``blocker``: blocks every catchable signal in its stop listener, then never returns;
- ``all_kinds``: all of the above in one worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

SLEEP = ["sleep", "1000"]


def _record(pids: list[int]) -> None:
    d = os.environ["MB_ESCAPE_DIR"]
    path = os.path.join(d, str(os.getpid()))
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(str(p) for p in [os.getpid(), *pids]) + "\n")
    os.rename(path + ".tmp", path)


def _child() -> int:
    return subprocess.Popen(SLEEP).pid


def _setsid() -> int:
    return subprocess.Popen(SLEEP, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid


def _daemon() -> int:
    """The classic double fork: the daemon is re-parented away from us at once."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.close(w)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.execvp(SLEEP[0], SLEEP)
            os.write(w, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


def _block_in_stop(bus) -> None:
    forever = threading.Event()

    def stop() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            forever.wait(3600)

    bus.subscribe("stop", stop, 1)  # first of the stop listeners


def _on_start(bus, make) -> None:
    bus.subscribe("start", lambda: _record([m() for m in make]), 90)


def child(bus) -> None:
    _on_start(bus, [_child])


def setsid(bus) -> None:
    _on_start(bus, [_setsid])


def daemon(bus) -> None:
    _on_start(bus, [_daemon])


def blocker(bus) -> None:
    _block_in_stop(bus)
    _on_start(bus, [])


def all_kinds(bus) -> None:
    _block_in_stop(bus)
    _on_start(bus, [_child, _setsid, _daemon])
