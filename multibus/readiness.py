"""Ready checks: when a started program counts as STARTED (a group's ``ready`` key).

A check is a string, parsed and validated once (:func:`parse`, at config time: a ValueError is
one line naming what is wrong):

- ``"tcp:HOST:PORT"`` (``tcp:[::1]:6379`` for IPv6): a TCP connect to it succeeds;
- ``"file:/path"``: the file exists;
- ``"delay:1.5"``: that many seconds have passed since the process started.

:func:`wait_ready` runs one on a loop that must never block (the supervisor's process-manager
thread): every attempt is non-blocking (a connect in progress is carried over to the next
attempt), and attempts are spaced by ``call_later`` (anything with the
:class:`~multibus.wakeup.CallQueue` signature), 10 ms at first, then up to 100 ms apart. It
ends with one call ``done(ok, why)``: ready, or not within ``timeout`` (``why`` names the
check), or cancelled by the caller (no call). Not tied to processes or buses: whatever
needs "wait until X accepts connections" (rolling reloads, later) can use it as it is.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multibus.sockets import parse_address

__all__ = ["ReadyCheck", "ReadyWait", "parse", "wait_ready"]

FIRST_GAP = 0.01  # s between the first attempts
MAX_GAP = 0.1  # s between attempts, at most


@dataclass(frozen=True)
class ReadyCheck:
    """A parsed check: ``kind`` (tcp | file | delay) and its argument; ``str()`` is the text."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"file:{self.path}" if self.kind == "file" else f"delay:{self.seconds:g}"

    def probe(self) -> Probe:
        """A fresh series of attempts (the delay counts from now)."""
        return Probe(self)


def parse(text: str) -> ReadyCheck:
    """``'tcp:127.0.0.1:6379'`` / ``'file:/run/app.ready'`` / ``'delay:1.5'`` -> a check;
    ValueError (one line, with the expected forms) on anything else."""
    forms = "expected 'tcp:HOST:PORT', 'file:/PATH' or 'delay:SECONDS'"
    if not isinstance(text, str):
        raise ValueError(f"ready check {text!r}: {forms}")
    kind, sep, arg = text.partition(":")
    if not sep or not arg:
        raise ValueError(f"ready check {text!r}: {forms}")
    if kind == "tcp":
        try:  # the address grammar of [sockets.NAME], without unix: and port 0
            family, addr = parse_address(arg)
        except ValueError:
            family, addr = socket.AF_UNIX, ""
        if family == socket.AF_UNIX or not addr[1]:
            raise ValueError(f"ready check {text!r}: expected 'tcp:HOST:PORT' with a port "
                             "1-65535 (IPv6: 'tcp:[::1]:PORT')")
        return ReadyCheck("tcp", host=addr[0], port=addr[1])
    if kind == "file":
        return ReadyCheck("file", path=arg)
    if kind == "delay":
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"ready check {text!r}: expected 'delay:SECONDS' with a number "
                             ">= 0")
        return ReadyCheck("delay", seconds=seconds)
    raise ValueError(f"ready check {text!r}: unknown kind {kind!r}; {forms}")


class Probe:
    """Attempts of one check; :meth:`attempt` never blocks. Close it when done."""

    def __init__(self, check: ReadyCheck) -> None:
        self.check = check
        self.t0 = time.monotonic()
        self.sock: socket.socket | None = None
        self.last_error = ""  # why the last attempt failed, for a message

    def attempt(self) -> bool:
        """One attempt: True once the check passes."""
        kind = self.check.kind
        if kind == "delay":
            return time.monotonic() - self.t0 >= self.check.seconds
        if kind == "file":
            return os.path.exists(self.check.path)
        return self._connect()

    def wait_hint(self) -> float | None:
        """How long until the check can pass, if known (a delay): no earlier attempt."""
        if self.check.kind == "delay":
            return max(0.0, self.t0 + self.check.seconds - time.monotonic())
        return None

    def _connect(self) -> bool:
        if self.sock is None:
            try:
                info = socket.getaddrinfo(self.check.host, self.check.port,
                                          type=socket.SOCK_STREAM)[0]
            except OSError as e:
                self.last_error = str(e)
                return False
            self.sock = socket.socket(info[0], socket.SOCK_STREAM)
            self.sock.setblocking(False)
            err = self.sock.connect_ex(info[4])
            if err == errno.EINPROGRESS:
                return False  # the next attempt looks at the outcome
        else:
            if not select.select([], [self.sock], [], 0)[1]:
                return False  # still in progress
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self.close()
            return True
        self.last_error = os.strerror(err)
        self.close()
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ReadyWait:
    """One :func:`wait_ready` under way; :meth:`cancel` ends it without calling ``done``."""

    def __init__(self, probe: Probe, call_later: Callable[[float, Callable[[], Any]], Any],
                 done: Callable[[bool, str], None], timeout: float) -> None:
        self.probe = probe
        self.call_later = call_later
        self.done = done
        self.deadline = probe.t0 + timeout
        self.timeout = timeout
        self.gap = FIRST_GAP
        self.handle: Any = None
        self.over = False

    def cancel(self) -> None:
        self.over = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.probe.close()

    def _step(self) -> None:
        self.handle = None
        if self.over:
            return
        if self.probe.attempt():
            self.over = True
            self.done(True, f"ready check {self.probe.check} passed")
            return
        now = time.monotonic()
        if now >= self.deadline:
            self.cancel()
            why = f": {self.probe.last_error}" if self.probe.last_error else ""
            self.done(False, f"ready check {self.probe.check} did not pass within "
                             f"{self.timeout:g}s{why}")
            return
        hint = self.probe.wait_hint()
        gap = self.gap if hint is None else hint
        self.gap = min(self.gap * 2, MAX_GAP)
        self.handle = self.call_later(max(0.0, min(gap, self.deadline - now)), self._step)


def wait_ready(check: ReadyCheck, call_later: Callable[[float, Callable[[], Any]], Any],
               done: Callable[[bool, str], None], timeout: float) -> ReadyWait:
    """Attempt ``check`` now and then on ``call_later``'s loop until it passes or ``timeout``
    s have passed; then ``done(ok, why)`` once, on that loop. ``.cancel()`` the result to stop
    (``done`` is then not called)."""
    wait = ReadyWait(check.probe(), call_later, done, timeout)
    wait.handle = call_later(0.0, wait._step)
    return wait
