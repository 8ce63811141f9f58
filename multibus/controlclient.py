"""The client of a supervisor's control socket: what every ``multibus`` command but ``run`` uses.

:class:`ControlClient` sends one request per DEALER socket to ``<runtime dir>/<name>.ctl`` and
waits a bounded time for the reply (msgpack maps, protocol :data:`PROTOCOL`; the server and
the request schemas are :mod:`multibus.control` and :mod:`multibus.commands`).
:func:`resolve_name` and :func:`~multibus.rundir.running_supervisors` find a supervisor by
name in the runtime dir.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import zmq

from multibus.actions import ControlError, NotRunning
from multibus.logview import Record
from multibus.rundir import control_path, running_supervisors
from multibus.rundir import name_owner as _owner

__all__ = ["MAX_REPLY", "MAX_WAIT", "PROTOCOL", "ControlClient", "resolve_name"]

PROTOCOL = 1
MAX_REPLY = 4 << 20
MAX_WAIT = 5.0  # the longest a request ('logs', 'op_status') may ask to be held, in seconds


def refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not accepted")


def resolve_name(name: str | None, default: str = "multibus") -> str:
    """The supervisor a control command talks to: ``name`` if given; else ``default`` if it
    runs or nothing runs; else the only running one; several -> ControlError naming them."""
    if name:
        return name
    running = running_supervisors()
    if default in running or not running:
        return default
    if len(running) == 1:
        return next(iter(running))
    raise ControlError(f"several supervisors are running ({', '.join(sorted(running))}); "
                       "choose one with --name NAME")


class ControlClient:
    """Talk to the supervisor called ``name`` (one DEALER socket per request)."""

    def __init__(self, name: str, timeout: float = 5.0) -> None:
        self.name = name
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._holds = True  # the supervisor holds a request until its op ends (op_status wait)

    def pid(self) -> int | None:
        """The live supervisor's pid (from the hub lock), or None."""
        return _owner(self.name)

    def _not_running(self, pid: int | None = None) -> NotRunning:
        if pid and self.pid() == pid:
            return NotRunning(f"supervisor {self.name!r} (pid {pid}) has no control socket now "
                              "(starting, exiting, or near its file descriptor limit); retry")
        running = running_supervisors()
        others = f" (running: {', '.join(sorted(running))})" if running else ""
        return NotRunning(f"no supervisor named {self.name!r} is running{others}")

    def request(self, cmd: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request; return the reply (``ok`` true) or raise ControlError/NotRunning."""
        pid = self.pid()
        try:
            path = control_path(self.name)
        except FileNotFoundError:
            raise self._not_running() from None
        if not pid or not path.exists():
            raise self._not_running(pid)
        rid = next(self._ids)
        timeout = self.timeout if timeout is None else timeout
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
            sock.connect(f"ipc://{path}")
            sock.send(msgpack.packb({"v": PROTOCOL, "id": rid, "cmd": cmd, **args},
                                    use_bin_type=True))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    if not self.pid():
                        raise self._not_running()
                    raise ControlError(f"supervisor {self.name!r} (pid {pid}) did not answer "
                                       f"{cmd!r} within {timeout:g}s")
                reply = msgpack.unpackb(sock.recv(), raw=False, ext_hook=refuse_ext)
                if not isinstance(reply, dict) or reply.get("v") != PROTOCOL:
                    raise ControlError(f"supervisor {self.name!r}: unexpected reply")
                if reply.get("id") not in (rid, 0):
                    continue  # a late answer to an earlier request
                if not reply.get("ok"):
                    raise ControlError(str(reply.get("error", "request failed")))
                return reply
        finally:
            sock.close(0)

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def op(self, action: str, targets: Iterable[str] = ()) -> dict[str, Any]:
        """Queue ``action`` on ``targets`` (groups or workers; none: every group)."""
        targets = list(targets)
        if not targets:  # the request of every version
            return self.request("op", action=action)
        return self.request("op", action=action, targets=targets)

    def scale(self, group: str, count: int) -> dict[str, Any]:
        return self.request("scale", group=group, count=count)

    def wait_op(self, op_id: int, timeout: float) -> dict[str, Any]:
        """Return operation ``op_id``'s status once it is done or failed; ControlError on
        timeout. The supervisor holds each request until the op ends (up to MAX_WAIT s);
        one that cannot hold it (an older supervisor, or too many held) is polled."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            wait = min(MAX_WAIT, max(0.0, left)) if self._holds else 0.0
            asked = time.monotonic()
            try:
                reply = self.request("op_status", timeout=self.timeout + wait, op=op_id,
                                     **({"wait": wait} if wait else {}))
            except ControlError as e:
                if not (self._holds and "op_status: expected keys" in str(e)):
                    raise
                self._holds = False  # a supervisor from before 'wait': poll it
                continue
            if reply["state"] in ("done", "failed"):
                return reply
            if time.monotonic() >= deadline:
                raise ControlError(f"{reply['action']} is still {reply['state']} after "
                                   f"{timeout:g}s (it stays queued; check `multibus status`)")
            if time.monotonic() - asked < wait or not wait:
                time.sleep(0.05)  # answered without being held: do not spin

    def logs(self, since: int = 0, group: str | None = None, limit: int = 1000,
             wait: float = 0.0) -> tuple[list[Record], int]:
        reply = self.request("logs", timeout=self.timeout + wait, since=since, group=group,
                             limit=limit, wait=wait)
        return [tuple(r) for r in reply["records"]], int(reply["next"])  # type: ignore[misc]

    def follow(self, group: str | None = None, backlog: int = 100) -> Iterable[Record]:
        """Yield the last ``backlog`` records, then new ones as they come, until the
        supervisor goes away."""
        recs, nxt = self.logs(0, group, max(1, backlog)) if backlog else ([], 0)
        if not backlog:
            _, nxt = self.logs(0, group, 1)
        yield from recs
        while True:
            try:
                recs, nxt = self.logs(nxt, group, 1000, wait=2.0)
            except NotRunning:
                return
            yield from recs
