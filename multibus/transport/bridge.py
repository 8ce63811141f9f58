"""Bridge: a plugin that joins a local bus to the buses of other processes over ZeroMQ.

One process is the **hub** (binds; normally the parent), the others are **peers** (connect).
Two separate jobs:

* **Mirroring.** A publish on a mirrored channel is delivered to that channel's listeners in
  every other connected process, in publish order per sender, never echoed to its origin: a
  peer's publishes go up to the hub, which dispatches them on its own bus and relays the same
  frame down to every peer (peers drop frames of their own origin).
* **Lifecycle.** The hub commands a peer's bus to start, stop, graceful or exit; the peer
  reports each state change of its own bus and its 'log' records, which the hub re-publishes.

Sockets (all owned by ONE daemon I/O thread per bridge; other threads hand it work through
deques plus an eventfd that wakes its poller)::

    hub ROUTER  <-> peer DEALER (routing id = peer name)  control: hello/welcome, cmd/ack,
                                                          state, heartbeats, sync-ready, bye
    hub XPUB     -> peer SUB                              down: mirrored publishes, sync probes
    hub PULL    <-  peer PUSH                             up: mirrored publishes and logs

A peer that mirrors no channel (a worker that only follows lifecycle commands) has nothing to
read downstream and does not connect to 'down': its hello says so (``down=False``) and it
counts as joined at hello, without a sync probe. A connection less to set up and tear down on
both sides, which a fleet of 50 pays at every start and stop.

Delivery rules (see ``wire.py`` for the frame format):

* Mirrored publishes are packed in the publisher's thread (so a bad argument raises there) and
  sent in batches with sequence numbers per (origin, epoch); a gap is counted and logged with
  its size. Sends never block the I/O thread: on EAGAIN (XPUB_NODROP, PUSH at its HWM) the frame
  stays queued and is retried; after ``send_timeout`` seconds it is dropped, counted and logged.
  A publisher blocks (up to ``send_timeout``) while the bridge holds ``max_queue`` messages.
* A peer with channels counts as *joined* (``peer.joined`` on the hub) only once a sync
  probe sent down the XPUB reached it, so from then on nothing the hub publishes can miss it
  (slow joiner); a peer without channels, at its hello.
* Commands are desired state, not actions: each peer has a desired state (STARTED, STOPPED or
  EXITING) and a graceful generation counter on the hub, sent with the hub's epoch (random per
  hub instance) and a sequence number; the peer acks on receipt, applies each (epoch, seq) once
  on its own non-daemon command thread (never on the I/O thread: transitions can block; it
  ends after 1 s idle or at exit), and the hub resends until acked. A peer that says hello
  (late, restarted, reconnected) gets the current desired state. A fresh peer takes the hub's
  graceful generation as its baseline: graceful reaches the peers that exist when commanded.
* Liveness: application heartbeats both ways (plus ZMTP heartbeats). The hub publishes
  ``peer.lost`` when a peer misses ``peer_timeout`` or its connection is gone; a peer publishes
  ``hub.lost`` on the control socket's DISCONNECTED event or a heartbeat timeout.
  ``heartbeat=None`` (for local ipc peers whose death the owner learns
  otherwise, e.g. a pidfd) sends no heartbeats at all: an idle bridge then has no timer and
  its threads (and libzmq's) sleep until there is work. Death is still seen through the
  connection: a peer's DISCONNECTED -> ``hub.lost``; on the hub a control disconnect makes it
  probe its peers (ROUTER_MANDATORY names the gone one) -> ``peer.lost(name, 'disconnected')``.
  A hung-but-connected process is then not detected by the bridge. Mixed set-ups work: a
  side without heartbeats answers each heartbeat it gets that is not itself an answer, so the
  other side's timeout holds (and a probe is answered once, not bounced).
* After ``hub.lost`` a peer closes with linger 0 (nobody is left to read its last words).
* Every received frame is validated; anything else is dropped and counted in ``stats()``.
  The I/O thread survives any input; it exits on the bus's 'exit' (listener priority 95, after
  the others), flushing what it can within a bounded LINGER.
* Received publishes and logs reach the local bus from a dispatch thread, started when the
  first is received; a peer given ``apply_via`` publishes its events (``hub.joined``,
  ``hub.lost``, the bridge's warnings) through it instead, in order with the commands.

Channels published on the hub's bus: ``peer.joined(name, pid)``, ``peer.state(name, state)``,
``peer.lost(name, reason)`` (reason: 'heartbeat timeout', 'disconnected', 'exited', 'left'),
``peer.log(name, msg, level)`` and ``log(f"{name} | {msg}", level)``. On a peer's bus:
``hub.joined(name)`` and ``hub.lost(reason)``. The bridge's own warnings go to 'log'.
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import zmq

from multibus.transport import wire
from multibus.transport.endpoints import (
    CurveConfig,
    Endpoints,
    apply_client,
    apply_server,
    private_ipc,
    remove_ipc,
    require_security,
    start_authenticator,
)

__all__ = ["Bridge", "BridgeError", "RESERVED_CHANNELS"]

#: Channels that are never mirrored: lifecycle channels travel as commands, 'log' upstream only.
RESERVED_CHANNELS = frozenset(("start", "stop", "exit", "graceful", "log", "main"))
ACTIONS = {"start": "STARTED", "stop": "STOPPED", "exit": "EXITING", "graceful": None}

EXIT_PRIORITY = 95  # run after the other 'exit' listeners, so they can still use the bridge
DATA_HWM = 128  # frames (each up to max_message) queued per data pipe
LINGER_MS = 1000
SYNC_INTERVAL = 0.01
PENDING_FRAMES = 16  # frames waiting for a socket before we stop building/reading more
DISPATCH_BACKLOG = 64  # frames waiting for the dispatch thread before we stop reading
PAUSED_POLL_MS = 20  # input paused for the dispatch thread: look again at least this often
APPLIER_IDLE = 1.0  # seconds the command thread waits for the next command before ending
SEQ_TABLE = 1024  # (origin, epoch) pairs remembered for gap detection
_NEVER = float("inf")  # no timer due (heartbeat=None and nothing pending): poll without timeout
PROBE_DELAYS = (0.0, 0.1, 0.5)  # hub, heartbeat=None: probe peers after a control disconnect

_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


_MONITOR_HEAD = struct.Struct("=hi")  # libzmq monitor event: u16 event, i32 value (+ address)


def _monitor_event(frames: list[bytes]) -> int:
    """The event number of a socket-monitor message (zmq.utils.monitor.parse_monitor_message
    without its import, which pulls in asyncio: ~30 ms of every worker's start-up)."""
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError("not a socket-monitor message")
    return _MONITOR_HEAD.unpack(frames[0])[0]


class BridgeError(RuntimeError):
    """The bridge could not do what was asked (bind, connect, queue a message)."""


class _Local(threading.local):
    remote: str | None = None  # channel this thread is dispatching from the wire (no echo)
    packer: msgpack.Packer | None = None


class _Peer:
    """Hub-side record of one peer (owned by the I/O thread; read under the table lock)."""

    __slots__ = ("name", "ident", "desired", "graceful", "cmd_seq", "pending", "next_send",
                 "pid", "peer_epoch", "state", "published_state", "connected", "joined",
                 "token", "last_seen", "down")

    def __init__(self, name: str, ident: bytes, desired: str | None = None,
                 graceful: int = 0) -> None:
        self.name = name
        self.ident = ident
        self.desired = desired
        self.graceful = graceful
        self.cmd_seq = 0
        self.pending = False  # a cmd not yet acked
        self.next_send = 0.0
        self.pid = 0
        self.peer_epoch = 0
        self.state: str | None = None
        self.published_state: str | None = None
        self.connected = False
        self.joined = False
        self.token = 0
        self.last_seen = 0.0
        self.down = True  # the peer reads 'down' (it mirrors channels): sync before joined


def _state_name(state: object) -> str:
    name = getattr(state, "name", None)
    if isinstance(name, str) and name in wire.STATE_NAMES:
        return name
    text = str(state).rsplit(".", 1)[-1]
    return text if text in wire.STATE_NAMES else "STOPPED"


def _nonzero_u63() -> int:
    return random.SystemRandom().getrandbits(63) or 1


class Bridge:
    """Join ``bus`` to other processes' buses (see the module docstring).

    ``role`` 'hub' binds ``endpoints`` (default: ``private_ipc(name)``, removed again on exit);
    'peer' connects to them (required). ``channels`` are mirrored both ways. ``heartbeat`` is
    the application heartbeat interval and ``peer_timeout`` the silence after which the other
    side is reported lost; ``heartbeat=None`` turns heartbeats off (this side then only
    answers the other side's; see the module docstring). ``max_message`` is the frame size
    limit (ZMQ MAXMSGSIZE on every receiving socket): a publish whose packed size exceeds
    ``max_message - 512`` raises in the publisher; both sides should use the same value (a
    peer adopts the hub's if smaller). ``apply_via`` (peer) says where lifecycle commands
    run: None, in the bridge's own command thread; else a function that runs a callable in
    some thread of the caller's choosing, in call order (a worker passes ``bus.defer``: its
    main thread idles in ``block()`` anyway, and a thread less is quicker to start and exit).
    """

    def __init__(
        self,
        bus: Any,
        *,
        role: str,
        name: str,
        endpoints: Endpoints | str | None = None,
        channels: Iterable[str] = (),
        heartbeat: float | None = 0.5,
        peer_timeout: float = 2.0,
        curve: CurveConfig | None = None,
        max_message: int = wire.MAX_MESSAGE,
        send_timeout: float = 5.0,
        max_queue: int = 100_000,
        apply_via: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        if role not in ("hub", "peer"):
            raise ValueError(f"Bridge role must be 'hub' or 'peer', not {role!r}")
        if not wire.valid_name(name):
            raise ValueError(
                f"invalid bridge name {name!r}: use 1-{wire.MAX_NAME} characters from "
                "[A-Za-z0-9_.-], not starting with '.' or '-'"
            )
        if isinstance(channels, str):
            channels = (channels,)
        chans = frozenset(channels)
        for ch in chans:
            if not isinstance(ch, str) or not ch or len(ch) > wire.MAX_CHANNEL:
                raise ValueError(f"invalid mirrored channel {ch!r}: a non-empty str, at most "
                                 f"{wire.MAX_CHANNEL} characters")
            if ch in RESERVED_CHANNELS or ch.startswith(("peer.", "hub.")):
                raise ValueError(
                    f"channel {ch!r} cannot be mirrored: lifecycle channels travel as commands "
                    "(Bridge.command), 'log' goes upstream by itself, 'main' and the bridge's "
                    "own peer.*/hub.* channels stay local; pick another channel name"
                )
        if heartbeat is not None and (not heartbeat > 0 or not peer_timeout > heartbeat):
            raise ValueError(
                f"need 0 < heartbeat < peer_timeout, got heartbeat={heartbeat}, "
                f"peer_timeout={peer_timeout}"
            )
        if not wire.MIN_MESSAGE <= max_message <= (1 << 31):
            raise ValueError(f"max_message must be {wire.MIN_MESSAGE}..2**31 bytes, "
                             f"not {max_message}")
        if role == "peer" and endpoints is None:
            raise ValueError(f"peer bridge {name!r} needs the hub's endpoints (endpoints=...)")
        self.bus = bus
        self.role = role
        self.name = name
        self.channels = chans
        self.heartbeat = None if heartbeat is None else float(heartbeat)
        self.peer_timeout = float(peer_timeout)
        self.curve = curve
        self.max_message = int(max_message)
        self.send_timeout = float(send_timeout)
        self.max_queue = int(max_queue)
        self.endpoints: Endpoints | None = (
            None if endpoints is None else Endpoints.parse(endpoints)
        )
        self.epoch = _nonzero_u63()
        self._hub = role == "hub"
        self._owns_ipc = False
        self._limit = wire.entry_limit(self.max_message)  # read by publisher threads
        self._frame_limit = self.max_message
        self._retry = 0.25 if heartbeat is None else max(0.05, min(0.25, heartbeat / 2))
        self._hub_gone = False  # peer: hub.lost seen; close with linger 0 (nobody reads)
        self._abandoned = False  # abandon() called: close with linger 0, whatever happens
        self._probe_at = 0.0  # hub: look for gone peers (a control pipe disconnected)
        self._probe_start = 0.0
        self._tls = _Local()

        # handed from any thread to the I/O thread
        self._out: collections.deque[tuple[str, bool, bytes]] = collections.deque()
        self._logs: collections.deque[bytes] = collections.deque()
        self._states: collections.deque[str] = collections.deque()
        self._calls: collections.deque[Any] = collections.deque()
        self._room = threading.Condition()
        self._waiting_room = 0
        self._wake_fd = -1
        self._fd_lock = threading.Lock()
        self._sleeping = False
        self._streaming_until = 0.0  # I/O thread: until then, poll every 1 ms, no wake-ups
        self._stop_requested = False

        # handed from the I/O thread to the dispatch thread
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._put = 0  # I/O thread only
        self._done = 0  # dispatch thread only

        self._stats: dict[str, int] = collections.defaultdict(int)
        self._warned: dict[str, int] = collections.defaultdict(int)
        self._peers_lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._default_desired: str | None = None
        self._default_graceful = 0
        self._cmd_seq = 0
        self._ack_waiters: list[tuple[Any, dict[str, int]]] = []  # (held Lock, name->seq)

        # peer side
        self._hub_epoch = 0
        self._welcomed = False
        self._hub_seen = 0.0
        self._last_state: object = None
        self._reported: str | None = None
        self._apply_lock = threading.Lock()
        self._apply_cond = threading.Condition(self._apply_lock)
        self._wants: collections.deque[tuple[int, str | None, int]] = collections.deque()
        self._applied_graceful: dict[int, int] = {}
        self._applier: threading.Thread | None = None
        self._apply_via = apply_via
        self._last_cmd: tuple[int, int] = (0, -1)

        self._listeners: list[tuple[str, Any]] = []
        self._io: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._closed = threading.Event()
        self._lifecycle_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Bridge {self.role} {self.name!r} {self.endpoints}>"

    # ---------------------------------------------------------------- plugin protocol

    def subscribe(self) -> Bridge:
        """Bind (hub) or connect (peer), start the I/O thread and subscribe to the bus.
        Returns once the sockets are bound/connected; raises if they cannot be."""
        with self._lifecycle_lock:
            if self._io is not None:
                return self
            if self.endpoints is None:
                self.endpoints = private_ipc(self.name)
                self._owns_ipc = True
            require_security(self.endpoints, self.curve, self.role)
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._io = threading.Thread(
                target=self._io_main, name=f"bridge-io-{self.name}", daemon=True
            )
            self._io.start()
            self._ready.wait()
            if self._open_error is not None:
                err = self._open_error
                self._io.join(5)
                self._io = None
                self._release()
                raise BridgeError(
                    f"{self.role} bridge {self.name!r} could not "
                    f"{'bind' if self._hub else 'connect'} {self.endpoints}: {err}"
                ) from err
            for ch in sorted(self.channels):
                self._listen(ch, self._mirror_listener(ch), 50)
            if not self._hub:
                self._listen("log", self._on_log, 50)
            self._listen("exit", self._on_exit, EXIT_PRIORITY)
            return self

    def abandon(self) -> None:
        """Leave without last words: when this bridge closes, it lingers on nothing.

        For a peer whose hub is known to be gone (PDEATHSIG, the supervisor's SIGTERM): the
        bridge already does this itself after 'hub.lost'. Safe from any thread.
        """
        self._abandoned = True

    def unsubscribe(self) -> None:
        """Leave: unsubscribe from the bus, flush what is queued (bounded), close the sockets
        and stop the threads. Also done by the bus's 'exit'. Idempotent."""
        self._shutdown()

    def _listen(self, channel: str, callback: Any, priority: int) -> None:
        self.bus.subscribe(channel, callback, priority=priority)
        self._listeners.append((channel, callback))

    def _on_exit(self) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lifecycle_lock:
            io = self._io
            if io is None or self._stop_requested:
                return
            for channel, callback in self._listeners:
                try:
                    self.bus.unsubscribe(channel, callback)
                except Exception:  # a bus that lost the listener already
                    pass
            self._listeners.clear()
            if not self._hub:
                self._note_state()  # EXITING, if that is why we are here
            self._stop_requested = True
            self._wake()
        with self._apply_lock:
            self._apply_cond.notify_all()  # an idle command thread ends now (block() joins it)
        if io is not threading.current_thread():
            io.join(LINGER_MS / 1000 + self.send_timeout + 2)
        self._inbox.put(None)
        d = self._dispatcher
        if d is not None and d is not threading.current_thread():
            d.join(2)

    def _release(self) -> None:
        """Give back the fd and the ipc name (after the I/O thread closed its sockets)."""
        with self._fd_lock:
            fd, self._wake_fd = self._wake_fd, -1
            if fd >= 0:
                os.close(fd)
        if self._owns_ipc and self.endpoints is not None:
            try:
                remove_ipc(self.endpoints)
            except OSError:
                pass
            self._owns_ipc = False

    # ---------------------------------------------------------------- public API

    def stats(self) -> dict[str, int]:
        """Counters: sent/received/relayed/dispatched messages, frames, invalid frames (total
        and ``invalid_<reason>``), gaps/lost/stale, send retries/dropped, refused publishes,
        command sends/retries/applies, connection events, and the current queue length."""
        out = dict(self._stats)
        out["queued"] = len(self._out)
        out["dispatch_backlog"] = self._put - self._done
        for key in ("sent", "received", "invalid", "gaps", "lost", "retries", "dropped"):
            out.setdefault(key, 0)
        return out

    def command(
        self, action: str, peers: Iterable[str] | None = None, wait: float | None = None
    ) -> bool | None:
        """(hub) Set the desired state of ``peers`` (default: every peer, including those
        that join later): ``start``, ``stop``, ``exit``, or ``graceful`` (one reload, for the
        peers that exist now). Asynchronous: resent until each peer acks. With ``wait``
        (seconds), block until every targeted peer that is connected now has acked (received,
        not yet applied) and return whether they all did in time; else return None."""
        if not self._hub:
            raise BridgeError(f"Bridge.command() is for the hub; {self.name!r} is a peer")
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {sorted(ACTIONS)}")
        names = None
        if peers is not None:
            names = [peers] if isinstance(peers, str) else list(peers)
            for n in names:
                if not wire.valid_name(n):
                    raise ValueError(f"invalid peer name {n!r}")
        if wait is None:
            self._call(self._do_command, action, names, None)
            return None
        # A held lock the I/O thread releases on the last ack: the least work between waking
        # the I/O thread and blocking, and on the way back (an Event is a Condition + lock).
        done = threading.Lock()
        done.acquire()
        self._calls.append((self._do_command, (action, names, done)))
        self._wake()
        return done.acquire(timeout=max(0.0, wait))

    def peers(self) -> dict[str, dict[str, Any]]:
        """(hub) name -> {'pid', 'state', 'desired', 'connected', 'joined', 'last_seen'}."""
        with self._peers_lock:
            return {
                p.name: {
                    "pid": p.pid,
                    "state": p.state,
                    "desired": p.desired,
                    "connected": p.connected,
                    "joined": p.joined,
                    "last_seen": p.last_seen,
                }
                for p in self._peers.values()
            }

    def forget(self, name: str) -> None:
        """(hub) Drop a peer's record (its desired state included)."""
        self._call(self._do_forget, name)

    # ---------------------------------------------------------------- any thread -> I/O

    def _wake(self) -> None:
        with self._fd_lock:  # never write to a closed (maybe reused) fd number
            if self._wake_fd >= 0:
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError:
                    pass

    def _call(self, func: Any, *args: Any) -> None:
        self._calls.append((func, args))
        self._wake()

    def _mirror_listener(self, channel: str) -> Any:
        tls = self._tls
        out = self._out
        pack = wire.pack_entry

        def mirror(*args: Any, **kwargs: Any) -> None:
            if tls.remote == channel:
                return  # this publish came from the wire: do not send it back
            packer = tls.packer
            if packer is None:
                packer = tls.packer = msgpack.Packer()
            try:
                data = pack(packer, channel, args, kwargs, self._limit)
            except (TypeError, ValueError):
                self._stats["refused"] += 1
                raise
            out.append((channel, bool(kwargs), data))
            if len(out) > self.max_queue:
                self._wait_for_room(channel)
            if self._sleeping:
                self._wake()

        mirror.__name__ = f"mirror_{channel}"
        mirror.__qualname__ = f"Bridge.mirror[{channel}]"
        return mirror

    def _wait_for_room(self, channel: str) -> None:
        if self._stop_requested or threading.current_thread() is self._io:
            return
        deadline = time.monotonic() + self.send_timeout
        with self._room:
            self._waiting_room += 1
            try:
                while len(self._out) > self.max_queue // 2 and not self._stop_requested:
                    self._wake()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BridgeError(
                            f"bridge {self.name!r}: {len(self._out)} mirrored messages queued "
                            f"for {self.send_timeout}s (publish on {channel!r}); the other side "
                            "is not reading; publish less or raise max_queue"
                        )
                    self._room.wait(min(left, 0.05))
            finally:
                self._waiting_room -= 1

    def _on_log(self, msg: Any = "", level: Any = 20, *args: Any, **kwargs: Any) -> None:
        """(peer) Forward a 'log' record upstream; note a state change announced by it."""
        packer = self._tls.packer
        if packer is None:
            packer = self._tls.packer = msgpack.Packer()
        logs = self._logs
        logs.append(wire.pack_log(packer, msg, level, self._limit))
        self._note_state()
        if len(logs) == 1:
            # Logs carry state reports and command results: wake the I/O thread even while
            # it streams (then it only looks every 1 ms), unless a wake-up is already due.
            self._wake()

    def _note_state(self) -> None:
        state = self.bus.state
        if state is not self._last_state:
            self._last_state = state
            self._states.append(_state_name(state))
            self._wake()

    # ---------------------------------------------------------------- I/O thread

    def _io_main(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self._open_error = exc
            self._close_sockets()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop_requested:
                try:
                    self._loop_once()
                except zmq.ContextTerminated:
                    break
                except Exception as exc:  # never die on input or a bug: count, log, go on
                    self._stats["internal_errors"] += 1
                    self._warn("internal", f"I/O thread error: {type(exc).__name__}: {exc}", 40)
                    time.sleep(0.01)
            self._flush_on_close()
        finally:
            self._close_sockets()
            self._release()
            self._closed.set()

    def _open(self) -> None:
        ctx = self._ctx = zmq.Context()
        self._auth = None
        self._monitors: dict[Any, str] = {}
        self._poller = zmq.Poller()
        self._sockets: list[zmq.Socket] = []
        ep = self.endpoints
        assert ep is not None
        hb_ms = 0 if self.heartbeat is None else int(self.heartbeat * 1000)
        timeout_ms = int(self.peer_timeout * 1000)

        def make(kind: int, label: str, monitor: bool = True) -> zmq.Socket:
            s = ctx.socket(kind)
            self._sockets.append(s)
            s.linger = LINGER_MS
            s.maxmsgsize = self.max_message
            if hb_ms:  # no ZMTP heartbeats: libzmq's I/O thread then has no idle timers
                s.setsockopt(zmq.HEARTBEAT_IVL, hb_ms)
                s.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
                s.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)
            s.reconnect_ivl = 50
            s.reconnect_ivl_max = 1000
            if self.curve is not None:
                if self._hub:
                    apply_server(s, self.curve.keys)
                else:
                    assert self.curve.server_public is not None
                    apply_client(s, self.curve.keys, self.curve.server_public)
            if monitor:
                mon = s.get_monitor_socket(_MONITOR_EVENTS)
                self._monitors[mon] = label
                self._poller.register(mon, zmq.POLLIN)
            return s

        if self._hub:
            if self.curve is not None:
                self._auth = start_authenticator(ctx, self.curve.allowed)
            self._control = make(zmq.ROUTER, "control")
            self._control.router_mandatory = 1
            self._control.router_handover = 1
            self._down = make(zmq.XPUB, "down")
            self._down.setsockopt(zmq.XPUB_NODROP, 1)
            self._down.sndhwm = DATA_HWM
            self._up = make(zmq.PULL, "up")
            self._up.rcvhwm = DATA_HWM
            self._control.bind(ep.control)
            self._down.bind(ep.down)
            self._up.bind(ep.up)
            resolved = Endpoints(
                self._control.last_endpoint.decode(),
                self._down.last_endpoint.decode(),
                self._up.last_endpoint.decode(),
            )
            if resolved != ep:
                self.endpoints = resolved
            self._data_in = self._up
            self._data_out = self._down
        else:
            self._control = make(zmq.DEALER, "control")
            self._control.routing_id = self.name.encode()
            self._control.immediate = 1  # control frames go to a live hub or fail at once
            # A peer watches its control connection only (hub lost, handshake and CURVE
            # failures); two more monitors would cost every worker start and exit.
            self._down = self._data_in = None  # no channels: nothing to read downstream
            if self.channels:
                self._down = self._data_in = make(zmq.SUB, "down", monitor=False)
                self._down.rcvhwm = DATA_HWM
                self._down.setsockopt(zmq.SUBSCRIBE, b"")
            self._up = self._data_out = make(zmq.PUSH, "up", monitor=False)
            self._up.sndhwm = DATA_HWM
            self._control.connect(ep.control)
            if self._down is not None:
                self._down.connect(ep.down)
            self._up.connect(ep.up)
        self._poller.register(self._control, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)
        if self._hub:
            self._poller.register(self._down, zmq.POLLIN)  # subscription messages
        self._reading_data = False
        self._set_data_reading(True)
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._pending_since = 0.0
        self._seqs: dict[tuple[str, int], int] = {}
        self._seq = 0
        self._own_prefix = wire.origin_prefix("pub", self.name)
        now = time.monotonic()
        self._next_tick = now
        self._next_hb = now
        self._next_hello = now
        if not self._hub:
            self._note_state()

    def _set_data_reading(self, on: bool) -> None:
        if on != self._reading_data:
            if self._data_in is None:
                pass  # a peer without channels: nothing to read
            elif on:
                self._poller.register(self._data_in, zmq.POLLIN)
            else:
                self._poller.unregister(self._data_in)
            self._reading_data = on

    def _loop_once(self) -> None:
        now = time.monotonic()
        if now >= self._next_tick:
            self._tick(now)
        if self._pending or now < self._streaming_until:
            # A stream is flowing (or a send is blocked): look again within 1 ms without
            # asking publishers to wake us. Waking costs them a syscall that also hands us
            # the GIL after every message, which would shrink batches to a few messages.
            timeout = 1
            if self._calls or self._states:
                timeout = 0
        else:
            nt = self._next_tick
            timeout = -1 if nt == _NEVER else max(0, int((nt - now) * 1000) + 1)
            self._sleeping = True  # from here on publishers wake us; then re-check the queues
            if self._calls or self._states or self._out or self._logs:
                timeout = 0
            elif not self._reading_data and not 0 <= timeout <= PAUSED_POLL_MS:
                timeout = PAUSED_POLL_MS  # the dispatch thread wakes us; this is a backstop
        events = self._poller.poll(timeout)
        self._sleeping = False
        calls = self._calls
        while calls:  # commands first: a command is sent before a batch of input is read
            func, args = calls.popleft()
            func(*args)
        for sock, _ in events:
            if sock is self._control:
                self._recv_control()
            elif sock is self._data_in:
                self._recv_data()
            elif sock == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except OSError:
                    pass
            elif sock is self._down:  # hub XPUB: subscription messages, nothing to do
                self._drain(self._down)
            elif sock in self._monitors:
                self._recv_monitor(sock)
        while self._calls:
            func, args = self._calls.popleft()
            func(*args)
        if self._states:
            self._send_states()
        self._flush()
        backlog = self._put - self._done
        self._set_data_reading(
            backlog < DISPATCH_BACKLOG and len(self._pending) < PENDING_FRAMES
        )
        if self._waiting_room and len(self._out) <= self.max_queue // 2:
            with self._room:
                self._room.notify_all()

    # -- receiving

    def _invalid(self, reason: str, detail: str) -> None:
        st = self._stats
        st["invalid"] += 1
        st["invalid_" + reason] += 1
        self._warn(reason, f"dropped invalid frame: {detail}", 30)

    def _warn(self, key: str, text: str, level: int) -> None:
        """Log the first 3 of a kind, then every 10th power: an attack must not flood."""
        n = self._warned[key] = self._warned[key] + 1
        if n <= 3 or (n & (n - 1)) == 0 and n >= 1024:
            suffix = f" ({n} so far)" if n > 3 else ""
            self._emit("log", f"multibus bridge {self.name!r}: {text}{suffix}", level)

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(256):
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _recv_control(self) -> None:
        sock = self._control
        hub = self._hub
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._stats["frames_in"] += 1
            if len(frames) != (2 if hub else 1):
                self._invalid("frames", f"control message of {len(frames)} frames")
                continue
            try:
                kind, msg = wire.decode(frames[-1], self._frame_limit)
            except wire.WireError as exc:
                self._invalid(exc.reason, str(exc))
                continue
            if hub:
                self._hub_control(frames[0], kind, msg)
            else:
                self._peer_control(kind, msg)

    def _recv_data(self) -> None:
        sock = self._data_in
        for _ in range(64):
            if self._put - self._done >= DISPATCH_BACKLOG or len(self._pending) >= PENDING_FRAMES:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._stats["frames_in"] += 1
            if len(frames) != 1:
                self._invalid("frames", f"data message of {len(frames)} frames")
                continue
            frame = frames[0]
            if frame.startswith(self._own_prefix, 1):
                self._stats["own_skipped"] += 1
                continue  # our own publishes, relayed by the hub to everyone: never echo
            try:
                kind, msg = wire.decode(frame, self._frame_limit)
            except wire.WireError as exc:
                self._invalid(exc.reason, str(exc))
                continue
            if kind == "pub":
                self._recv_pub(frame, msg)
            elif kind == "log" and self._hub:
                self._recv_log(msg)
            elif kind == "sync" and not self._hub:
                if msg["target"] == self.name:
                    self._send_control(wire.encode("ready", token=msg["token"]))
            else:
                where = "up" if self._hub else "down"
                self._invalid("unexpected", f"{kind!r} frame on the {where} socket")

    def _recv_pub(self, frame: bytes, msg: dict[str, Any]) -> None:
        origin = msg["origin"]
        if origin == self.name:
            return  # our own publish relayed back by the hub: never echo
        runs = msg["runs"]
        n = 0
        for run in runs:
            n += len(run[2])
        key = (origin, msg["epoch"])
        seq = msg["seq"]
        seqs = self._seqs
        expected = seqs.get(key)
        if expected is not None and seq != expected:
            if seq < expected:
                self._stats["stale"] += 1
                self._warn("stale", f"stale batch from {origin!r} (seq {seq} < {expected})", 30)
                return
            lost = seq - expected
            self._stats["gaps"] += 1
            self._stats["lost"] += lost
            self._emit(
                "log",
                f"multibus bridge {self.name!r}: gap of {lost} messages from {origin!r} "
                f"(seq {expected}..{seq - 1} lost)",
                30,
            )
        elif expected is None:
            if len(seqs) >= SEQ_TABLE:
                del seqs[next(iter(seqs))]
        seqs[key] = seq + n
        self._stats["received"] += n
        if self._hub and self._relay_needed(origin):
            self._pending.append((frame, n))  # relay as is to the other peers
            self._stats["relayed"] += n
        self._dispatch(("pub", runs))

    def _relay_needed(self, origin: str) -> bool:
        """Relay a peer's batch down unless the origin is the only peer connected."""
        with self._peers_lock:
            for rec in self._peers.values():
                if rec.connected and rec.name != origin:
                    return True
        return False

    def _recv_log(self, msg: dict[str, Any]) -> None:
        origin = msg["origin"]
        self._stats["logs_received"] += len(msg["msgs"])
        self._dispatch(("logs", origin, msg["msgs"]))

    def _recv_monitor(self, mon: zmq.Socket) -> None:
        label = self._monitors[mon]
        for _ in range(64):
            try:
                ev = _monitor_event(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except Exception:
                return
            if ev & _HANDSHAKE_FAILED:
                self._stats["handshake_failed"] += 1
                if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    who = "a client" if self._hub else "the hub"
                    self._warn("auth", f"CURVE authentication with {who} failed on the "
                               f"{label} socket; check the keys and the allow-list", 40)
                else:
                    self._warn("handshake", f"ZMTP handshake failed on the {label} socket "
                               "(not a ZeroMQ peer, or a broken one)", 30)
            elif ev == zmq.EVENT_DISCONNECTED:
                self._stats["disconnects"] += 1
                if not self._hub and label == "control" and self._welcomed:
                    self._hub_lost("disconnected")
                elif self._hub and label == "control" and self.heartbeat is None:
                    # no heartbeat will notice: probe every peer now (and a bit later, as
                    # the ROUTER may drop the pipe after the event), EHOSTUNREACH names it
                    now = time.monotonic()
                    self._probe_start = self._probe_at = now
                    self._next_tick = now
            elif ev == zmq.EVENT_ACCEPTED:
                self._stats["accepted"] += 1
            elif ev == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self._hub and label == "control":
                self._send_hello()

    # -- hub control

    def _hub_control(self, ident: bytes, kind: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "hello":
            name = msg["name"]
            if ident != name.encode():
                self._invalid("unexpected", f"hello from routing id {ident[:64]!r} naming {name!r}")
                return
            self._peer_hello(ident, name, msg, now)
            return
        name = ident.decode("ascii", "replace")
        with self._peers_lock:
            rec = self._peers.get(name)
        if rec is None or not rec.connected or rec.ident != ident:
            if kind not in ("bye",):
                self._send_to(ident, wire.encode("who"))
            return
        rec.last_seen = now
        if kind == "hb":
            if msg["epoch"] != self.epoch:
                self._send_to(ident, wire.encode("who"))
                return
            if self.heartbeat is None and not msg["reply"]:
                # a peer that uses heartbeats times us out: answer (never an answer, or two
                # sides without heartbeats would bounce a probe's hb between them forever)
                self._send_to(ident, self._hb(self.epoch, reply=True))
            self._peer_state(rec, msg["state"])
        elif kind == "state":
            self._peer_state(rec, msg["state"])
        elif kind == "ack":
            if msg["epoch"] == self.epoch and msg["seq"] >= rec.cmd_seq:
                rec.pending = False
            if self._ack_waiters and msg["epoch"] == self.epoch:
                self._acked(rec.name, msg["seq"])
        elif kind == "ready":
            if msg["token"] == rec.token and not rec.joined:
                self._join(rec)
        elif kind == "bye":
            reason = "exited" if rec.state == "EXITING" else "left"
            self._lose_peer(rec, reason)
        else:
            self._invalid("unexpected", f"{kind!r} frame from peer {name!r}")

    def _peer_hello(self, ident: bytes, name: str, msg: dict[str, Any], now: float) -> None:
        with self._peers_lock:
            rec = self._peers.get(name)
            if rec is None:
                rec = self._peers[name] = _Peer(
                    name, ident, desired=self._default_desired, graceful=self._default_graceful
                )
                if rec.desired is not None:
                    self._cmd_seq += 1
                    rec.cmd_seq = self._cmd_seq
            fresh = rec.peer_epoch != msg["epoch"] or not rec.connected
            rec.ident = ident
            rec.pid = msg["pid"]
            rec.peer_epoch = msg["epoch"]
            rec.down = msg["down"]
            rec.connected = True
            rec.last_seen = now
            if fresh:
                rec.joined = False
                rec.token = _nonzero_u63()
        self._peer_state(rec, msg["state"])
        self._send_to(
            ident,
            wire.encode(
                "welcome", name=self.name, epoch=self.epoch, graceful=rec.graceful,
                max_message=self.max_message,
            ),
        )
        if rec.cmd_seq:
            rec.pending = True
            self._send_cmd(rec, now)
        if not rec.joined:
            if rec.down:
                self._send_sync(rec)
            else:
                self._join(rec)

    def _join(self, rec: _Peer) -> None:
        with self._peers_lock:
            rec.joined = True
        self._emit("peer.joined", rec.name, rec.pid)
        if rec.state is not None:
            rec.published_state = rec.state
            self._emit("peer.state", rec.name, rec.state)

    def _peer_state(self, rec: _Peer, state: str) -> None:
        if state != rec.state:
            with self._peers_lock:
                rec.state = state
        if rec.joined and state != rec.published_state:
            rec.published_state = state
            self._emit("peer.state", rec.name, state)

    def _lose_peer(self, rec: _Peer, reason: str) -> None:
        if not rec.connected:
            return
        with self._peers_lock:
            rec.connected = False
            rec.joined = False
            rec.pending = rec.cmd_seq > 0
        self._emit("peer.lost", rec.name, reason)

    def _send_to(self, ident: bytes, frame: bytes) -> bool:
        try:
            self._control.send_multipart((ident, frame), zmq.NOBLOCK)
            self._stats["frames_out"] += 1
            return True
        except zmq.Again:
            self._stats["control_blocked"] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                with self._peers_lock:
                    rec = self._peers.get(ident.decode("ascii", "replace"))
                if rec is not None and rec.ident == ident:
                    self._lose_peer(rec, "disconnected")
                return False
            raise

    def _send_cmd(self, rec: _Peer, now: float) -> None:
        if not rec.connected:
            return
        frame = wire.encode(
            "cmd", epoch=self.epoch, seq=rec.cmd_seq, state=rec.desired, graceful=rec.graceful
        )
        if self._send_to(rec.ident, frame):
            self._stats["cmd_sent"] += 1
        rec.next_send = t = now + self._retry
        if t < self._next_tick:
            self._next_tick = t  # resend until acked (the only timer of an idle hub)

    def _send_sync(self, rec: _Peer) -> None:
        t = time.monotonic() + SYNC_INTERVAL
        if t < self._next_tick:
            self._next_tick = t
        try:
            self._down.send(wire.encode("sync", target=rec.name, token=rec.token), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _do_command(
        self, action: str, names: list[str] | None, done: Any | None
    ) -> None:
        desired = ACTIONS[action]
        now = time.monotonic()
        if names is None:
            if desired is None:
                self._default_graceful += 1
            else:
                self._default_desired = desired
            with self._peers_lock:
                targets = list(self._peers.values())
        else:
            targets = []
            with self._peers_lock:
                for n in names:
                    rec = self._peers.get(n)
                    if rec is None:
                        rec = self._peers[n] = _Peer(
                            n, n.encode(), desired=self._default_desired,
                            graceful=self._default_graceful,
                        )
                    targets.append(rec)
        for rec in targets:
            self._cmd_seq += 1
            rec.cmd_seq = self._cmd_seq
            if desired is None:
                rec.graceful += 1
            else:
                with self._peers_lock:
                    rec.desired = desired
            rec.pending = True
            self._send_cmd(rec, now)
        if done is not None:
            needed = {rec.name: rec.cmd_seq for rec in targets if rec.connected}
            if needed:
                self._ack_waiters.append((done, needed))
            else:
                done.release()

    def _acked(self, name: str, seq: int) -> None:
        keep = []
        for done, needed in self._ack_waiters:
            if needed.get(name, seq + 1) <= seq:
                del needed[name]
            if needed:
                keep.append((done, needed))
            else:
                done.release()
        self._ack_waiters = keep

    def _do_forget(self, name: str) -> None:
        with self._peers_lock:
            self._peers.pop(name, None)

    # -- peer control

    def _peer_control(self, kind: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "welcome":
            new_hub = msg["epoch"] != self._hub_epoch
            self._hub_epoch = msg["epoch"]
            self._hub_seen = now
            was = self._welcomed
            self._welcomed = True
            self._hub_gone = False
            self._frame_limit = min(self.max_message, msg["max_message"])
            self._limit = wire.entry_limit(self._frame_limit)
            with self._apply_lock:
                if new_hub or msg["epoch"] not in self._applied_graceful:
                    self._applied_graceful = {msg["epoch"]: msg["graceful"]}
            if not was:
                self._emit("hub.joined", msg["name"])
            return
        if kind == "who":
            self._welcomed = False
            self._send_hello()
            return
        if kind == "hb":
            if msg["epoch"] != self._hub_epoch or not self._welcomed:
                self._send_hello()
            else:
                self._hub_seen = now
                if self.heartbeat is None and not msg["reply"]:  # a hub using heartbeats
                    self._send_control(self._hb(self._hub_epoch, reply=True))
            return
        if kind == "cmd":
            if msg["epoch"] != self._hub_epoch:
                self._send_hello()  # a command from a hub instance we have not met
                return
            self._hub_seen = now
            self._send_control(wire.encode("ack", epoch=msg["epoch"], seq=msg["seq"]))
            key = (msg["epoch"], msg["seq"])
            last_epoch, last_seq = self._last_cmd
            if key[0] == last_epoch and key[1] <= last_seq:
                return  # already applied (a resend): applied once
            self._last_cmd = key
            self._stats["cmd_received"] += 1
            self._apply(msg["epoch"], msg["state"], msg["graceful"])
            return
        self._invalid("unexpected", f"{kind!r} frame from the hub")

    def _hb(self, epoch: int, reply: bool) -> bytes:
        """A heartbeat frame: ``epoch`` as the sender knows the hub's, our bus state, and
        whether it answers one (answers are never answered)."""
        return wire.encode("hb", epoch=epoch, state=_state_name(self.bus.state), reply=reply)

    def _send_control(self, frame: bytes) -> bool:
        try:
            self._control.send(frame, zmq.NOBLOCK)
            self._stats["frames_out"] += 1
            return True
        except zmq.Again:
            self._stats["control_blocked"] += 1
            return False

    def _send_hello(self) -> None:
        self._next_hello = t = time.monotonic() + self._retry
        if t < self._next_tick:
            self._next_tick = t  # retried until welcomed
        self._send_control(
            wire.encode(
                "hello", name=self.name, pid=os.getpid(), epoch=self.epoch,
                state=_state_name(self.bus.state), down=bool(self.channels),
            )
        )

    def _hub_lost(self, reason: str) -> None:
        self._welcomed = False
        self._hub_gone = True  # nobody reads our last words: close with linger 0
        self._next_tick = min(self._next_tick, self._next_hello)
        self._emit("hub.lost", reason)

    def _send_states(self) -> None:
        while self._states:
            state = self._states.popleft()
            if state != self._reported:
                self._reported = state
                if self._welcomed:
                    self._send_control(wire.encode("state", state=state))

    # -- peer: applying commands (own thread)

    def _apply(self, epoch: int, desired: str | None, graceful: int) -> None:
        with self._apply_lock:
            self._wants.append((epoch, desired, graceful))
            if self._apply_via is None:
                if self._applier is not None:
                    self._apply_cond.notify()
                else:
                    self._applier = threading.Thread(
                        target=self._applier_main, name=f"bridge-apply-{self.name}",
                        daemon=False,
                    )
                    self._applier.start()
                return
        self._apply_via(self._apply_queued)

    def _apply_queued(self) -> None:
        """(``apply_via``) Apply the commands received so far, in order."""
        while self._apply_next():
            pass

    def _applier_main(self) -> None:
        """Apply the commands received, in order, until none came for APPLIER_IDLE s; then end.
        Non-daemon, so a ``block()`` in the main thread waits for an exit applied here to
        finish."""
        while True:
            with self._apply_lock:
                if not self._wants and not self._stop_requested:
                    # stay a moment for the next command: a thread start costs ~100 us
                    self._apply_cond.wait(APPLIER_IDLE)
                if not self._wants:
                    self._applier = None
                    return
            try:
                self._apply_next()
            except (KeyboardInterrupt, SystemExit):
                pass  # logged by _apply_next; this thread goes on with the next command

    def _apply_next(self) -> bool:
        """Apply the oldest command received; False if there was none. Each command is the
        full desired state: a graceful (generation above the one applied) runs first, then
        the transition to the desired state, if any is needed. A failing transition is
        counted and logged; KeyboardInterrupt and SystemExit are re-raised as well."""
        bus = self.bus
        with self._apply_lock:
            if not self._wants:
                return False
            epoch, desired, graceful = self._wants.popleft()
            base = self._applied_graceful.get(epoch)
            run_graceful = base is not None and graceful > base
            if run_graceful or base is None:
                self._applied_graceful = {epoch: graceful}
        try:
            if run_graceful and desired != "EXITING":
                bus.graceful()
            state = self._settled_state()
            if desired == "STARTED" and state == "STOPPED":
                bus.start()
            elif desired == "STOPPED" and state == "STARTED":
                bus.stop()
            elif desired == "EXITING" and state != "EXITING":
                bus.exit()
            self._stats["cmd_applied"] += 1
        except BaseException as exc:
            self._stats["cmd_failed"] += 1
            try:
                bus.log(f"multibus bridge {self.name!r}: applying {desired or 'graceful'} "
                        f"failed: {type(exc).__name__}: {exc}", 40)
            except Exception:
                pass
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        return True

    def _settled_state(self, timeout: float = 30.0) -> str:
        """The bus state once it is not STARTING/STOPPING (another thread may be moving it);
        bounded, since a stuck start listener must not freeze the applier forever."""
        deadline = time.monotonic() + timeout
        while True:
            state = _state_name(self.bus.state)
            if state not in ("STARTING", "STOPPING") or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    # -- timers

    def _tick(self, now: float) -> None:
        """Timers. With heartbeats: every min(retry, heartbeat). With ``heartbeat=None`` only
        what is pending (command resends, sync probes, hello retries, disconnect probes) sets
        a timer, so an idle bridge sleeps in poll() without a timeout."""
        hub = self._hub
        hb_ivl = self.heartbeat
        if hb_ivl is None:
            next_tick = _NEVER
            self._next_hb = _NEVER
        else:
            next_tick = now + min(self._retry, hb_ivl)
        if hub:
            syncing = False
            with self._peers_lock:
                recs = list(self._peers.values())
            beat = now >= self._next_hb
            probe = self._probe_at and now >= self._probe_at
            if probe:
                self._probe_at = 0.0
                for delay in PROBE_DELAYS:  # the next scheduled probe, if any
                    if now + 0.001 < self._probe_start + delay:
                        self._probe_at = self._probe_start + delay
                        next_tick = min(next_tick, self._probe_at)
                        break
            if beat or probe:
                if hb_ivl is not None and beat:
                    self._next_hb = now + hb_ivl
                hb = self._hb(self.epoch, reply=False)
            for rec in recs:
                if not rec.connected:
                    continue
                if hb_ivl is not None and now - rec.last_seen > self.peer_timeout:
                    self._lose_peer(rec, "heartbeat timeout")
                    continue
                if beat or probe:
                    # ROUTER_MANDATORY: a peer whose pipe is gone fails -> 'disconnected'
                    self._send_to(rec.ident, hb)
                    if not rec.connected:
                        continue
                if rec.pending:
                    if now >= rec.next_send:
                        self._stats["cmd_retries"] += 1
                        self._send_cmd(rec, now)
                    next_tick = min(next_tick, rec.next_send)
                if not rec.joined and rec.connected and rec.down:
                    syncing = True
                    self._send_sync(rec)
            if syncing:
                next_tick = min(next_tick, now + SYNC_INTERVAL)
        else:
            if (hb_ivl is not None and self._welcomed
                    and now - self._hub_seen > self.peer_timeout):
                self._hub_lost("heartbeat timeout")
            if not self._welcomed:
                if now >= self._next_hello:
                    self._send_hello()
                next_tick = min(next_tick, self._next_hello)
            if now >= self._next_hb:
                self._next_hb = now + hb_ivl
                if self._welcomed:
                    self._send_control(self._hb(self._hub_epoch, reply=False))
            self._note_state()
        self._next_tick = min(next_tick, self._next_hb)

    # -- sending data

    def _build_frames(self) -> None:
        """Pack queued publishes (and peer logs) into batch frames up to the frame limit;
        consecutive publishes on one channel (with or without kwargs) share a run."""
        limit = self._frame_limit - wire.FRAME_OVERHEAD
        pending = self._pending
        q = self._out
        while q and len(pending) < PENDING_FRAMES:
            runs: list[tuple[str, bool, list[bytes]]] = []
            size = count = 0
            cur_ch: str | None = None
            cur_kw = False
            cur: list[bytes] = []
            while q and count < wire.MAX_BATCH:
                ch, haskw, data = q[0]
                size += len(data)
                if ch is not cur_ch or haskw is not cur_kw:
                    size += len(ch) + 8
                    if size > limit and count:
                        break
                    cur_ch, cur_kw, cur = ch, haskw, []
                    runs.append((ch, haskw, cur))
                elif size > limit:
                    break
                q.popleft()
                cur.append(data)
                count += 1
            pending.append((wire.encode_pub(self.name, self.epoch, self._seq, runs), count))
            self._seq += count
            self._stats["sent"] += count
        logs = self._logs
        while logs and not self._hub and len(pending) < PENDING_FRAMES:
            batch: list[bytes] = []
            size = 0
            while logs and len(batch) < wire.MAX_BATCH:
                size += len(logs[0])
                if size > limit and batch:
                    break
                batch.append(logs.popleft())
            self._stats["logs_sent"] += len(batch)
            pending.append((wire.encode_logs(self.name, batch), 0))

    def _flush(self) -> None:
        if self._out or self._logs:
            self._build_frames()
            self._streaming_until = time.monotonic() + 0.02
        pending = self._pending
        if not pending:
            return
        sock = self._data_out
        while pending:
            frame, n = pending[0]
            try:
                sock.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
            except zmq.Again:
                now = time.monotonic()
                self._stats["retries"] += 1
                if not self._pending_since:
                    self._pending_since = now
                elif now - self._pending_since > self.send_timeout:
                    pending.popleft()
                    self._pending_since = 0.0
                    self._stats["dropped"] += n
                    self._emit(
                        "log",
                        f"multibus bridge {self.name!r}: dropped {n} mirrored messages after "
                        f"{self.send_timeout}s: the {'down' if self._hub else 'up'} socket is "
                        "full (a receiver is not reading)",
                        40,
                    )
                    continue
                return
            pending.popleft()
            self._pending_since = 0.0
            self._stats["frames_out"] += 1

    def _flush_on_close(self) -> None:
        """Last words, bounded: queued publishes/logs/states, then bye (peer)."""
        deadline = time.monotonic() + min(self._linger_ms() / 1000, self.send_timeout)
        if not self._hub:
            self._note_state()
            self._send_states()
        while (self._out or self._logs or self._pending) and time.monotonic() < deadline:
            self._flush()
            if self._pending:
                time.sleep(0.002)
        if not self._hub:
            self._send_control(wire.encode("bye"))

    def _linger_ms(self) -> int:
        """LINGER for closing: 0 once the hub is lost (peer), since nobody reads our last
        words and a dead ipc/tcp peer would only make us wait; else LINGER_MS."""
        return 0 if self._hub_gone or self._abandoned else LINGER_MS

    def _close_sockets(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return
        for s in getattr(self, "_sockets", []):
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
        for mon in list(getattr(self, "_monitors", {})):
            mon.close(linger=0)
        linger = self._linger_ms()
        for s in getattr(self, "_sockets", []):
            s.close(linger=linger)
        if self._auth is not None:
            self._auth.stop()
        ctx.term()
        self._ctx = None

    # ---------------------------------------------------------------- dispatch thread

    def _emit(self, channel: str, *args: Any) -> None:
        """(I/O thread) publish on the local bus, in order: through ``apply_via`` on a peer
        given one, else from the dispatch thread."""
        if self._apply_via is not None and not self._hub:
            self._apply_via(functools.partial(self._publish_event, channel, args))
        else:
            self._dispatch(("event", channel, args))

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        """(I/O thread) queue for the dispatch thread, started at the first item."""
        self._put += 1
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(
                target=self._dispatch_main, name=f"bridge-dispatch-{self.name}", daemon=True
            )
            self._dispatcher.start()
        self._inbox.put(item)

    def _publish_event(self, channel: str, args: tuple[Any, ...]) -> None:
        try:
            if channel == "log":
                self.bus.log(*args)
            else:
                self.bus.publish(channel, *args)
        except Exception:  # a failing listener was logged by the bus; count it, go on
            self._stats["dispatch_errors"] += 1

    def _dispatch_main(self) -> None:
        bus = self.bus
        inbox = self._inbox
        while True:
            item = inbox.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "pub":
                    self._deliver(item[1])
                elif kind == "event":
                    self._publish_event(item[1], item[2])
                elif kind == "logs":
                    origin = item[1]
                    for msg, level in item[2]:
                        bus.publish("peer.log", origin, msg, level)
                        bus.log(f"{origin} | {msg}", level)
            except BaseException:  # a failing listener was logged by the bus; keep going
                self._stats["dispatch_errors"] += 1
            finally:
                self._done += 1
                if not self._reading_data and self._put - self._done == DISPATCH_BACKLOG // 2:
                    self._wake()  # input paused for us: the I/O thread may read again

    def _deliver(self, runs: list[list[Any]]) -> None:
        """Publish received messages on the local bus. ``tls.remote`` tells our own mirror
        listener not to send them back (a listener publishing on the *same* channel from in
        here is therefore not mirrored either; other channels are)."""
        publish = self.bus.publish
        tls = self._tls
        mirrored = self.channels
        ignored = failed = total = 0
        for ch, haskw, entries in runs:
            total += len(entries)
            if ch not in mirrored:
                ignored += len(entries)
                continue
            tls.remote = ch
            if haskw:
                for args, kw in entries:
                    try:
                        publish(ch, *args, **kw)
                    except Exception:
                        failed += 1
            else:
                for args in entries:
                    try:
                        publish(ch, *args)
                    except Exception:
                        failed += 1
        tls.remote = None
        st = self._stats
        st["dispatched"] += total - ignored
        if ignored:
            st["ignored"] += ignored
        if failed:
            st["dispatch_errors"] += failed
