"""Control socket of a running supervisor: ``multibus status | stop | scale | logs ...``.

Server: :class:`Control`, a plugin on the supervisor's bus. ONE daemon thread owns an ipc
ROUTER bound at ``<runtime dir>/<name>.ctl`` (the private 0700 dir, so only this user can
connect; bound only once this process holds the hub name, so it never steals another
supervisor's socket). Requests and replies are msgpack maps, validated key by key (exact keys,
types, sizes; ``MAXMSGSIZE`` on the socket); nothing is ever unpickled.

Every request is answered at once. Transitions (start, stop, restart, graceful, exit, scale)
are *queued*: they run one at a time, in arrival order, on the thread sitting in
``bus.block()`` (via ``bus.defer``), so they never overlap each other or a signal-driven
transition, and a command sent while the fleet is starting or stopping is never refused.
The reply carries an operation id; ``op_status`` says queued / running / done / failed.

The client, :class:`~multibus.controlclient.ControlClient`, is in :mod:`multibus.controlclient`
(re-exported here).

Protocol (version 1). Request: ``{"v": 1, "id": u32, "cmd": str, ...}`` with exactly the
extra keys of that command's schema; every command (status, op, scale, op_status, logs,
signal), its
schema, its answer and its CLI side are declared once in :mod:`multibus.commands`.
Reply: ``{"v": 1, "id": <request id>, "ok": true, ...}`` or ``{..., "ok": false,
"error": str}``. See :meth:`Control.status` for the status document.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from multibus import fdbudget
from multibus.commands import (
    ACTIONS,
    COMMANDS,
    TRANSITIONS,
    U32,
    ControlError,
    NotRunning,
    is_int,
    state_of,
)
from multibus.containment import Containment
from multibus.controlclient import PROTOCOL, ControlClient, refuse_ext, resolve_name
from multibus.logring import LogRing
from multibus.logview import SUPERVISOR, Record, split_source
from multibus.names import WorkerName
from multibus.opqueue import CANCELLED, Op, OpQueue
from multibus.rundir import control_path, running_supervisors
from multibus.rundir import name_owner as _owner
from multibus.sockets import bound_address
from multibus.targets import split_host
from multibus.transport.iothread import monitor_event
from multibus.transport.stats import RateLimit
from multibus.wakeup import Wakeup

__all__ = [
    "ACTIONS",
    "Control",
    "ControlClient",
    "ControlError",
    "NotRunning",
    "PROTOCOL",
    "control_path",
    "resolve_name",
    "running_supervisors",
]

MAX_REQUEST = 64 * 1024
#: The bridge counters ``status`` shows under "counters" -> "bridge": trouble, not traffic.
BRIDGE_COUNTERS = ("invalid", "gaps", "lost", "stale", "dropped", "handshake_failed",
                   "zap_refused", "name_refused")
_HZ = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time and start time in ticks
_PAGE = os.sysconf("SC_PAGE_SIZE")  # ... and RSS in pages
USAGE_REFRESH = 0.5  # s: a worker's CPU % and RSS read this recently are shown again as they were


def _uptime() -> float:
    """Seconds since boot: the clock of /proc/PID/stat's start time."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# --------------------------------------------------------------------------- validation

def decode_request(frame: bytes) -> dict[str, Any]:
    """Validate one request frame; ValueError says what is wrong."""
    if len(frame) > MAX_REQUEST:
        raise ValueError(f"request of {len(frame)} bytes is over {MAX_REQUEST}")
    try:
        req = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=refuse_ext,
                              use_list=True)
    except Exception as e:  # noqa: BLE001 - any decoding problem is a bad request
        raise ValueError(f"not a msgpack map: {type(e).__name__}") from None
    if not isinstance(req, dict):
        raise ValueError("not a msgpack map")
    if req.get("v") != PROTOCOL:
        raise ValueError(f"protocol version {req.get('v')!r} is not {PROTOCOL}")
    if not is_int(req.get("id"), *U32):
        raise ValueError("id must be an unsigned 32-bit integer")
    command = COMMANDS.get(req.get("cmd"))  # type: ignore[arg-type]
    if command is None:
        raise ValueError(f"unknown command {str(req.get('cmd'))[:40]!r}; "
                         f"known: {', '.join(COMMANDS)}")
    schema, optional = command.schema, command.optional
    keys = set(req) - {"v", "id", "cmd"}
    if not set(schema) <= keys <= set(schema) | set(optional):
        extra = f" (optional: {sorted(optional)})" if optional else ""
        raise ValueError(f"{req['cmd']}: expected keys {sorted(schema)}{extra}, "
                         f"got {sorted(keys)}")
    for key in keys:
        if not (schema.get(key) or optional[key])(req[key]):
            raise ValueError(f"{req['cmd']}: bad value for {key!r}")
    return req


# --------------------------------------------------------------------------- server

def _socket_status(sup: Any) -> list[dict[str, str]]:
    """The supervisor's listening sockets: name and the address bound (the real port when
    the fleet file says port 0)."""
    out = []
    for name, sock in sup.listening.items():
        if sock.fileno() >= 0:
            out.append({"name": name, "address": bound_address(sock)})
    return out


class Control:
    """Answer control requests for ``supervisor`` (a :class:`~multibus.supervisor.Supervisor`)
    on ``<runtime dir>/<name>.ctl``.

    ``exit_func`` performs an 'exit' (default ``bus.exit``; the CLI passes one that also tells
    systemd). ``interrupt_start`` (optional) is called when an 'exit' is queued while the bus is
    STARTING, so a slow start does not delay it (the CLI sends itself SIGTERM, which aborts the
    start). Also keeps the last ``log_size`` records of the bus's 'log' channel for ``logs``
(a :class:`~multibus.logring.LogRing`).
    Subscribe it AFTER the supervisor: the name must already be ours.
    """

    def __init__(self, bus: Any, supervisor: Any, *, name: str | None = None,
                 exit_func: Callable[[], Any] | None = None,
                 interrupt_start: Callable[[], Any] | None = None,
                 log_size: int = 5000) -> None:
        self.bus = bus
        self.sup = supervisor
        self.name = name or supervisor.name
        self.exit_func = exit_func or bus.exit
        self.interrupt_start = interrupt_start
        self.path: Path | None = None
        self.started = time.time()
        self.counts: dict[str, int] = {n: s.count for n, s in supervisor.specs.items()}
        self.invalid = 0  # requests that were not valid (counted, logged rate-limited)
        self.refused = 0  # valid requests refused (queue full, followers, unknown group...)
        self.paused = 0  # times it stopped listening, at its descriptor budget
        self._listening = False
        self._fds = 0  # descriptors open when it started listening
        self._warn = RateLimit()
        self.logs = LogRing(log_size, on_record=self._wake_followers)
        self._followers: list[tuple[bytes, dict[str, Any], float]] = []
        self.ops = OpQueue(self._perform, getattr(bus, "defer", None), bus.log,
                           interrupt=supervisor.reloader.interrupt,  # 'exit' stops a reload
                           ended=lambda op: self._wake_followers())
        # pid -> (start, CPU s, when read, CPU %, RSS bytes)
        self._procs: dict[int, tuple[int, float, float, float, int]] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._wakeup = Wakeup()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._subscribed = False
        self.hosts: Any = None  # a parent of hosts: its multibus.downstream.Downstream
        self._status_lock = threading.Lock()  # status() from the upstream reporter too

    # -- plumbing -------------------------------------------------------------------------

    def subscribe(self) -> Control:
        """Bind the control socket (in its own thread) and listen to 'log' and 'exit'."""
        if self._thread is not None:
            return self
        owner = _owner(self.name)
        if owner != os.getpid():
            raise ControlError(
                f"control socket for {self.name!r}: this process (pid {os.getpid()}) does not "
                f"hold the hub name (owner: {owner}); subscribe the Supervisor first")
        self.path = control_path(self.name, create=True)
        self.bus.subscribe("log", self.logs, 1)
        self.bus.subscribe("exit", self._on_exit, 99)
        self._subscribed = True
        self._thread = threading.Thread(target=self._run, name=f"multibus-control {self.name}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self.unsubscribe()
            raise ControlError(f"cannot bind control socket {self.path}: {self._error}")
        return self

    def unsubscribe(self) -> None:
        """Stop the thread (closing its socket, removing the file) and the listeners."""
        if self._subscribed:
            self.bus.unsubscribe("log", self.logs)
            self.bus.unsubscribe("exit", self._on_exit)
            self._subscribed = False
        if self._thread is not None:
            self._closing = True
            self._wakeup.wake()
            self._thread.join(5)
            self._thread = None

    def _on_exit(self) -> None:
        self.unsubscribe()

    def _wake_followers(self) -> None:
        """A record was kept or an op ended (on the thread that did it): serve the requests
        waiting for one (``logs -f``, an op's end)."""
        if self._followers:
            self._wakeup.wake()

    def records(self, since: int = 0, group: str | None = None,
                limit: int = 1000) -> tuple[list[Record], int]:
        """Records with seq > ``since`` (of ``group``: a group or worker name, or
        'supervisor'; on a parent of hosts also a host, ``HOST:GROUP``, ``HOST:GROUP.N`` or
        ``HOST:supervisor``), at most ``limit`` (the latest when ``since`` is 0); and the
        next seq."""
        host, rest = split_host(group) if group else (None, group)
        if host is None and group and self._is_host(group):
            host, rest = group, None
        if host is None:
            return self.logs.records(since, limit, lambda source: _matches(source, group))
        # a host's records: source = the host, text = its own record ("job.0 | text")
        return self.logs.records(since, limit, lambda source: source == host,
                                 lambda source, text: _matches(split_source(text)[0], rest))

    def _is_host(self, name: str) -> bool:
        """Whether a bare 'logs' filter names a host rather than a group here: it is not a
        local group, worker or 'supervisor', and this supervisor takes hosts."""
        return (self.hosts is not None and name != SUPERVISOR and name not in self.sup.specs
                and WorkerName.parse(name) is None)

    def check_source(self, source: str | None) -> None:
        """Raise ControlError unless ``source`` (a 'logs' filter) names 'supervisor', a group
        of this fleet, or a worker that runs or has logged; on a parent of hosts, or a host
        that joined (``HOST``, or its group, worker or 'supervisor': ``HOST:job.2``)."""
        if not source or source == SUPERVISOR or source in self.sup.specs:
            return
        host, rest = split_host(source)
        if host is not None:
            if self.hosts is None:
                raise ControlError(f"no host {host!r}: supervisor {self.name!r} takes no "
                                   "hosts (no [downstream] table)")
            self.hosts.check_log_source(host, rest)
            return
        if self._is_host(source) and self.hosts.has_host(source):
            return
        worker = WorkerName.parse(source)
        group = worker.group if worker is not None else source
        if group not in self.sup.specs:
            hosts = "" if self.hosts is None else f"; hosts: {self.hosts.names()}"
            raise ControlError(f"no group {group!r}; groups: {', '.join(self.sup.specs)}"
                               f"{hosts}")
        known = {r["name"] for r in self.sup.table() if r["group"] == group}
        if source in known or source in self.logs.sources():
            return
        names = ", ".join(sorted(known, key=WorkerName.parse)) or "none"
        raise ControlError(f"no worker {source!r}; workers of {group}: {names}")

    def follow(self, ident: bytes, req: dict[str, Any], most: int) -> bool:
        """Hold request ``req`` until its command's ``later`` has a reply or its wait is
        over; False if ``most`` requests are held already (answer it now)."""
        if len(self._followers) >= most:
            return False
        self._followers.append((ident, req, time.monotonic() + float(req["wait"])))
        return True

    # -- queued operations (see multibus.opqueue) ----------------------------------------

    def queue(self, action: str, **args: Any) -> Op:
        return self.ops.queue(action, **args)

    def cancel_waiting(self, reason: str = CANCELLED) -> int:
        return self.ops.cancel_waiting(reason)

    def op(self, op_id: int) -> Op | None:
        return self.ops.get(op_id)

    def pending(self) -> list[Op]:
        return self.ops.pending()

    def _perform(self, op: Op) -> str | None:
        state = state_of(self.bus)
        if state == "EXITING":
            raise ControlError("the supervisor is exiting")
        if self.hosts is not None and self.hosts.routes(op):  # HOST:TARGETs: theirs
            return self.hosts.perform(self, state, op)
        return TRANSITIONS[op.action].perform(self, state, op.args)

    # -- status ---------------------------------------------------------------------------

    def _usage(self, pid: int | None) -> tuple[float | None, int | None]:
        """(CPU %, RSS bytes) of ``pid``: CPU since the previous read, or averaged over the
        process's life the first time it is seen. One read of ``/proc/PID/stat`` (psutil
        reads several files), and none within USAGE_REFRESH of the last one: status asked
        over and over while 1,000 workers start costs no 3,000 system calls each time."""
        if not pid:
            return None, None
        prev = self._procs.get(pid)
        now = time.monotonic()
        if prev is not None and now - prev[2] < USAGE_REFRESH:
            return prev[3], prev[4]
        try:  # three system calls (open() adds fstat, ioctl and a read to EOF): each one
            # gives the GIL away, and the start of a large fleet keeps the others busy
            fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
            try:
                fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
            finally:
                os.close(fd)
        except (OSError, IndexError):
            self._procs.pop(pid, None)
            return None, None
        ticks = (int(fields[11]) + int(fields[12])) / _HZ
        start = int(fields[19])
        if prev is None or prev[0] != start:  # first seen (or the pid was reused)
            life = max(_uptime() - start / _HZ, 1e-3)
            cpu = 100.0 * ticks / life
        else:
            cpu = 100.0 * (ticks - prev[1]) / max(now - prev[2], 1e-3)
        cpu, rss = round(cpu, 1), int(fields[21]) * _PAGE
        self._procs[pid] = (start, ticks, now, cpu, rss)
        return cpu, rss

    def status(self) -> dict[str, Any]:
        """The status document (see :meth:`_status`), from any thread; on a parent of hosts
        with a ``hosts`` list and their groups and workers (each with ``host``)."""
        with self._status_lock:
            st = self._status()
        if self.hosts is not None:
            self.hosts.extend_status(st)
        return st

    def _status(self) -> dict[str, Any]:
        """The status document (stable keys; new keys may be added, none removed)::

            {"version": 1, "name", "pid", "state" (supervisor bus), "uptime",
             "groups": [{"name", "target", "count" (desired), "running",
                         and with max_memory or max_age set: "max_memory", "max_age",
                         "max_age_jitter", "replaced": {"max_memory": n, "max_age": n},
                         and, only where set: "cmd" + "ready" (a program's),
                         "limits": {"user", "group", "umask", "rlimits"},
                         "state" (STARTED, STOPPED, FATAL...), "error" (why FATAL), "after",
                         once reloaded: "generation", "new", "old"}],
             "workers": [{"group", "name", "index", "pid", "state", "restarts",
                          "exit_code", "uptime", "cpu_percent", "memory_rss",
                          "launch" ('fork', 'exec (why)', 'cmd'; None before its first spawn)}],
             "queue": [{"op", "action", "args", "state", "error", "note"}],
             "config": the fleet file it runs (absolute path) or None,
             "counters": {"control": {"invalid", "refused", "followers", "listening",
                                      "paused" (times it stopped listening: fd limit)},
                          "bridge": {BRIDGE_COUNTERS: the hub's; empty without one}},
             "containment": 'cgroup PATH' | 'scan (marker MULTIBUS_FLEET=ID)' | 'none',
             "sockets": [{"name", "address"}], a parent of hosts: "hosts" (see downstream)}
        """
        order = {g: i for i, g in enumerate(self.sup.specs)}  # groups in fleet-file order
        rows = self.sup.table()
        workers = []
        live = set()
        named = sorted(((order.get(r["group"], len(order)), WorkerName.parse(r["name"])), r)
                       for r in rows)  # parsed once: a 1,000-row status repeats it
        for (_, worker), r in named:
            cpu, rss = self._usage(r.get("pid"))
            if r.get("pid"):
                live.add(r["pid"])
            workers.append({
                "group": r["group"], "name": r["name"],
                "index": worker.index, "pid": r.get("pid"),
                "state": r["state"], "restarts": r["restarts"], "exit_code": r["exit_code"],
                "uptime": r["uptime"], "cpu_percent": cpu, "memory_rss": rss,
                "launch": r.get("launch"),
            })
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        groups = []
        for gname, spec in self.sup.specs.items():
            groups.append({
                "name": gname, "target": spec.target, "count": self.counts.get(gname, 0),
                "running": sum(1 for w in workers if w["group"] == gname and w["pid"]),
                **spec.status_fields(),
                **self.sup.group_status(gname),
            })
        return {
            "version": PROTOCOL, "name": self.name, "pid": os.getpid(), "state": state_of(self.bus),
            "uptime": round(time.time() - self.started, 3), "groups": groups,
            "workers": workers, "queue": [o.as_dict() for o in self.pending()],
            "config": self.sup.config,  # the fleet file (`multibus apply`), or None
            "counters": self.counters(),
            "containment": Containment.describe_active(),
            "sockets": _socket_status(self.sup),
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """What went wrong so far, by whom: the control socket's invalid and refused
        requests (and its waiting followers), and the hub bridge's trouble counters."""
        bridge = self.sup.bridge  # None until the supervisor subscribed
        stats = bridge.stats() if bridge is not None else {}
        return {"control": {"invalid": self.invalid, "refused": self.refused,
                            "followers": len(self._followers), "paused": self.paused,
                            "listening": int(self._listening)},
                "bridge": {k: stats[k] for k in BRIDGE_COUNTERS if k in stats}}

    # -- the socket thread ----------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context(1)
        sock = None
        try:
            assert self.path is not None
            try:
                self.path.unlink()  # a stale socket of a dead supervisor (the name is ours)
            except FileNotFoundError:
                pass
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.setsockopt(zmq.BACKLOG, 16)  # connections the kernel queues before accept
            sock.bind(f"ipc://{self.path}")
            self._listening = True
            self._fds = fdbudget.in_use()
            monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
        except BaseException as e:  # noqa: BLE001 - reported by subscribe()
            self._error = e
            if sock is not None:
                sock.close(0)
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self._closing:
                timeout = None
                if self._followers:
                    first = min(d for _, _, d in self._followers)
                    timeout = max(0, int((first - time.monotonic()) * 1000) + 1)
                if not self._listening:  # look for room again every 0.2 s
                    timeout = 200 if timeout is None else min(timeout, 200)
                events = dict(poller.poll(timeout))
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                # before any request: a reply means every connection before it was counted
                self._budget(sock, monitor)
                if sock in events:
                    for _ in range(100):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(sock, frames)
                if self._followers:
                    self._serve_followers(sock)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()
            try:
                if self.path is not None:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._wakeup.close()

    def _budget(self, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        """Stop listening when the connections accepted (libzmq's descriptor numbers tell:
        they come lowest first) reach the cap or the descriptors come near the limit, since
        libzmq aborts the process when accept() fails with EMFILE; listen again once the
        descriptors in use are back under half of that (see :mod:`multibus.fdbudget`)."""
        cap = fdbudget.connections_cap()
        for _ in range(1000):
            try:
                event, fd = monitor_event(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if (self._listening and event == zmq.EVENT_ACCEPTED
                    and (fd - self._fds >= cap or fdbudget.near_limit(fd))):
                sock.unbind(f"ipc://{self.path}")  # drops its connections; ECONNREFUSED
                self._listening = False
                self.paused += 1
                if (suffix := self._warn("paused")) is not None:
                    self.bus.log(f"control socket {self.path}: {fd - self._fds} connections, at "
                                 f"most {cap} under its file descriptor limit ({fdbudget.limit()})"
                                 f": not taking connections for now, those dropped; raise the "
                                 f"limit (ulimit -n){suffix}", 30)
        if (not self._listening and fdbudget.has_room()
                and fdbudget.in_use() - self._fds < cap // 2):
            sock.bind(f"ipc://{self.path}")
            self._listening = True
            if self._warn("resumed") is not None:
                self.bus.log(f"control socket {self.path}: taking connections again", 20)

    def _send(self, sock: zmq.Socket, ident: bytes, reply: dict[str, Any]) -> None:
        try:
            sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # client gone or not reading: its own timeout tells it

    def _invalid(self, why: str) -> None:
        """Count an invalid request; log the first few, then every power of two from 1024
        (a flood of them leaves a trace without flooding the log)."""
        self.invalid += 1
        suffix = self._warn("invalid")
        if suffix is not None:
            self.bus.log(f"control socket {self.path}: invalid request: {why}{suffix}", 30)

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._invalid(f"{len(frames)} frames")
            return
        ident, frame = frames
        try:
            req = decode_request(frame)
        except ValueError as e:
            self._invalid(str(e))
            self._send(sock, ident, {"v": PROTOCOL, "id": 0, "ok": False,
                                     "error": f"invalid request: {e}"})
            return
        try:
            reply = self._answer(ident, req)
        except ControlError as e:
            self.refused += 1
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - never let a request kill the thread
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        if reply is not None:
            reply.update(v=PROTOCOL, id=req["id"])
            self._send(sock, ident, reply)

    def _answer(self, ident: bytes, req: dict[str, Any]) -> dict[str, Any] | None:
        return COMMANDS[req["cmd"]].answer(self, ident, req)

    def _serve_followers(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        keep = []
        for ident, req, deadline in self._followers:
            reply = COMMANDS[req["cmd"]].later(self, req, now >= deadline or self._closing)
            if reply is not None:
                reply.update(v=PROTOCOL, id=req["id"])
                self._send(sock, ident, reply)
            else:
                keep.append((ident, req, deadline))
        self._followers = keep


def _matches(source: str, group: str | None) -> bool:
    if not group:
        return True
    if group == SUPERVISOR:
        return source == SUPERVISOR
    worker = WorkerName.parse(source)
    return source == group or (worker is not None and worker.group == group)
