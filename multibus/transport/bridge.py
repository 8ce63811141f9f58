"""Bridge: a plugin that joins a local bus to the buses of other processes over ZeroMQ.

One process is the **hub** (binds; normally the parent), the others are **peers** (connect).
Two separate jobs:

* **Mirroring.** A publish on a mirrored channel is delivered to that channel's listeners in
  every other connected process, in publish order per sender, never echoed to its origin: a
  peer's publishes go up to the hub, which dispatches them on its own bus and relays the same
  frame down to every peer (peers drop frames of their own origin). A hub made with
  ``relay=False`` keeps the peers' publishes to itself: its peers hear only the hub.
* **Lifecycle.** The hub commands a peer's bus to start, stop, graceful or exit; the peer
  reports each state change of its own bus and its 'log' records, which the hub re-publishes.

Sockets (all owned by ONE daemon I/O thread per bridge; other threads hand it work through
its call queue and the outbox's deques, plus the one wake-up pipe of its poller)::

    hub ROUTER  <-> peer DEALER (routing id = peer name)  control: hello/welcome, cmd/ack,
                                                          state, failed, heartbeats, sync-ready, bye
    hub ROUTER   -> peer DEALER (routing id = peer name)  down: mirrored publishes, sync probes
    hub ROUTER  <-  peer DEALER (routing id = peer name)  up: mirrored publishes and logs, taken
                                                          only from the connection of their origin

A peer that mirrors no channel (a worker that only follows lifecycle commands) has nothing to
read downstream and does not connect to 'down': its hello says so (``down=False``) and it
counts as joined at hello, without a sync probe. A connection less to set up and tear down on
both sides, which a fleet of 50 pays at every start and stop.

Delivery rules (see ``wire.py`` for the frame format):

* Mirrored publishes are packed in the publisher's thread (so a bad argument raises there) and
  sent in batches with sequence numbers per (origin, epoch); a gap is counted and logged with
  its size. Sends never block the I/O thread: on EAGAIN (a peer's 'up' at its HWM) the frame stays
  queued and is retried; after ``send_timeout`` seconds it is dropped, counted and logged.
  The hub sends to each peer on its own pipe and queue (``fanout``): a peer that makes no
  progress for ``send_timeout`` is *slow* (``peer.slow``), its messages are dropped and
  counted until it reads again, and no other peer, command or join ever waits for it.
  A publisher blocks (up to ``send_timeout``) while the bridge holds ``max_queue`` messages.
* A peer with channels counts as *joined* (``peer.joined`` on the hub) only once a sync
  probe sent to it on 'down' reached it, so from then on nothing the hub publishes can miss it
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
``peer.slow(name, why)`` (it does not read its mirrored messages: they are dropped for it; why
is '' once it reads again), ``peer.failed(name, desired, error)`` (a command failed there:
desired is 'STARTED', 'STOPPED', 'EXITING' or None for a graceful; error is "ExcType:
message"),
``peer.log(name, msg, level)`` and ``log(f"{name} | {msg}", level)``. On a peer's bus:
``hub.joined(name)`` and ``hub.lost(reason)``. The bridge's own warnings go to 'log'.

The parts, one module each (this one is the façade with the public API):

* ``iothread``: the thread that owns the sockets and frames (role-agnostic);
* ``hub`` / ``peer``: the two roles' sessions (peers and commands / hello, hub lost, states);
* ``fanout``: the hub's mirrored frames, per peer (its own queue; slow peers dropped for);
* ``outbox``: mirrored publishes and logs on their way out (the publisher-side hot path);
* ``dispatch``: what came in, published on the local bus from a thread of its own;
* ``applier``: a peer's bus following the hub's commands;
* ``stats``: the counters, written by the I/O thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from multibus.rundir import remove_sockets
from multibus.transport import wire
from multibus.transport.applier import Applier
from multibus.transport.dispatch import DISPATCH_BACKLOG, Dispatcher
from multibus.transport.endpoints import Endpoints, private_ipc, remove_ipc, shared_ipc
from multibus.transport.hub import ACTIONS, HubSession, nonzero_u63
from multibus.transport.iothread import LINGER_MS, IOThread
from multibus.transport.keys import CurveConfig, require_security
from multibus.transport.outbox import BridgeError, Outbox, ThreadState
from multibus.transport.peer import PeerSession
from multibus.transport.stats import BridgeStats

__all__ = ["DISPATCH_BACKLOG", "RESERVED_CHANNELS", "Bridge", "BridgeError"]

#: Channels that are never mirrored: lifecycle channels travel as commands, 'log' upstream only.
RESERVED_CHANNELS = frozenset(("start", "stop", "exit", "graceful", "log", "main"))
EXIT_PRIORITY = 95  # run after the other 'exit' listeners, so they can still use the bridge


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
    ``secret`` (peer): the secret whoever spawned this process gave it, proved in its hello
    to a hub told to :meth:`expect` it. ``relay`` (hub): False keeps each peer's publishes
    on the hub (dispatched there, not relayed to the other peers), for peers that talk to
    the hub alone: they neither read nor can publish to each other.
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
        secret: str | None = None,
        relay: bool = True,
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
        self.relay = bool(relay)
        self.secret = secret  # (peer) proves in its hello that it is the process spawned as name
        self.endpoints: Endpoints | None = (
            None if endpoints is None else Endpoints.parse(endpoints)
        )
        self.epoch = nonzero_u63()
        self._hub = role == "hub"
        self._owns_ipc = False
        self._shared: dict[int, Endpoints] = {}  # uid -> where peers running as it connect
        self._listeners: list[tuple[str, Any]] = []
        self._lifecycle_lock = threading.Lock()
        self._started = False
        self._holding_logs = False

        # the parts (no thread runs before subscribe())
        self._tls = tls = ThreadState()
        self._stats = stats = BridgeStats()
        self._dispatch = Dispatcher(bus, name, chans, tls, stats, wake_io=self._wake,
                                    apply_via=None if self._hub else apply_via)
        self._io = io = IOThread(self, stats, self._dispatch)
        stats.wake = io.wake
        io.outbox = self._outbox = Outbox(self, stats, tls, io, emit=io.emit)
        self._applier: Applier | None = None
        self._session: HubSession | PeerSession
        if self._hub:
            self._session = HubSession(self, io)
        else:
            self._applier = Applier(bus, name, stats, apply_via)
            self._session = PeerSession(self, io, self._applier)
            self._applier.on_failed = self._session.note_failure
        io.session = self._session
        io.on_closed = self._remove_ipc

    def __repr__(self) -> str:
        return f"<Bridge {self.role} {self.name!r} {self.endpoints}>"

    def _wake(self) -> None:
        self._io.wake()

    # ---------------------------------------------------------------- plugin protocol

    def subscribe(self) -> Bridge:
        """Bind (hub) or connect (peer), start the I/O thread and subscribe to the bus.
        Returns once the sockets are bound/connected; raises if they cannot be."""
        with self._lifecycle_lock:
            if self._started:
                return self
            if self.endpoints is None:
                self.endpoints = private_ipc(self.name)
                self._owns_ipc = True
            require_security(self.endpoints, self.curve, self.role)
            err = self._io.start()
            if err is not None:
                raise BridgeError(
                    f"{self.role} bridge {self.name!r} could not "
                    f"{'bind' if self._hub else 'connect'} {self.endpoints}: {err}"
                ) from err
            self._started = True
            for ch in sorted(self.channels):
                self._listen(ch, self._outbox.mirror_listener(ch), 50)
            if not self._hub and not self._holding_logs:
                self._listen("log", self._session.on_log, 50)
            self._listen("exit", self._on_exit, EXIT_PRIORITY)
            return self

    def hold_logs(self) -> Bridge:
        """(peer) Keep the bus's 'log' records from now on, to be sent in order once
        :meth:`subscribe` has connected. A worker calls it before its target runs, so what
        the target logs while it sets up is not lost (it connects only once the target
        returned). Returns the bridge."""
        if self._hub:
            raise BridgeError(f"Bridge.hold_logs() is for a peer; {self.name!r} is the hub")
        with self._lifecycle_lock:
            if not self._holding_logs and not self._started:
                self._holding_logs = True
                self._listen("log", self._session.on_log, 50)  # queued in the outbox
        return self

    def abandon(self) -> None:
        """Leave without last words: when this bridge closes, it lingers on nothing.

        For a peer whose hub is known to be gone (PDEATHSIG, the supervisor's SIGTERM): the
        bridge already does this itself after 'hub.lost'. Safe from any thread.
        """
        self._io.abandoned = True

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
        io = self._io
        with self._lifecycle_lock:
            if not self._started or io.stop_requested:
                return
            for channel, callback in self._listeners:
                try:
                    self.bus.unsubscribe(channel, callback)
                except Exception:  # noqa: BLE001 - a bus that lost it already
                    pass
            self._listeners.clear()
            if not self._hub:
                self._session.note_state()  # EXITING, if that is why we are here
            io.stop()
        if self._applier is not None:
            self._applier.stop()  # an idle command thread ends now (block() joins it)
        thread = io.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LINGER_MS / 1000 + self.send_timeout + 2)
        self._dispatch.stop()

    def share_with(self, uid: int, gid: int) -> Endpoints:
        """(hub, once subscribed) Endpoints where peers running as user ``uid`` (group
        ``gid``) can connect to this hub, which only this process's user can reach at its own
        ipc endpoints: the hub also listens in the shared dir, on sockets only ``uid`` may
        open (:func:`multibus.transport.endpoints.shared_ipc`). Made once per uid; removed
        when the hub closes. Raises ``BridgeError`` if they cannot be bound."""
        if not self._hub or not self._started or not self._owns_ipc:
            raise BridgeError(f"Bridge.share_with() is for a started hub on its own ipc "
                              f"endpoints; {self.name!r} is not one")
        with self._lifecycle_lock:
            if uid in self._shared:
                return self._shared[uid]
            ep = shared_ipc(self.name, uid)
            done = threading.Event()
            failed: list[BaseException] = []

            def bind() -> None:
                try:
                    self._session.share(ep, uid, gid)  # type: ignore[union-attr]
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    failed.append(e)
                done.set()

            self._io.call(bind)
            if not done.wait(10) or failed:
                raise BridgeError(f"hub {self.name!r} could not listen for user {uid} at {ep}: "
                                  f"{failed[0] if failed else 'its I/O thread did not answer'}")
            self._shared[uid] = ep
            return ep

    def _remove_ipc(self) -> None:
        """(I/O thread, its sockets closed) Give back the ipc name, if we chose it, and the
        shared endpoints."""
        for ep in self._shared.values():
            remove_sockets(ep.ipc_paths())
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
        out = self._stats.snapshot()
        out["queued"] = len(self._outbox.out)
        out["dispatch_backlog"] = self._dispatch.backlog
        return out

    def command(
        self, action: str, peers: Iterable[str] | None = None, wait: float | None = None
    ) -> bool | None:
        """(hub) Set the desired state of ``peers`` (default: every peer, including those
        that join later): ``start``, ``stop``, ``exit``, or ``graceful`` (one reload, for the
        peers that exist now). Asynchronous: resent until each peer acks. With ``wait``
        (seconds), block until every targeted peer that is connected now has acked (received,
        not yet applied) and return whether they all did in time; else return None."""
        session = self._session
        if not isinstance(session, HubSession):
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
            self._io.call(session.command, action, names, None)
            return None
        # A held lock the I/O thread releases on the last ack: the least work between waking
        # the I/O thread and blocking, and on the way back (an Event is a Condition + lock).
        done = threading.Lock()
        done.acquire()
        self._io.call(session.command, action, names, done)
        return done.acquire(timeout=max(0.0, wait))

    def origin(self) -> str | None:
        """The process whose mirrored publish the calling thread is delivering now (a
        listener called by this bridge's dispatch thread), else None: a listener that must
        trust only a publish's sender checks it (the ZAP allow-list binds a peer's name to
        its key, and the hub takes a frame only from its origin's connection)."""
        return self._tls.origin

    def peers(self) -> dict[str, dict[str, Any]]:
        """(hub) name -> {'pid', 'state', 'desired', 'connected', 'joined', 'last_seen'}."""
        session = self._session
        return session.peers() if isinstance(session, HubSession) else {}

    def expect(self, name: str, secret: str) -> None:
        """(hub) From now on a hello naming ``name`` must carry ``secret`` (a peer's
        ``secret=``); once any is expected, a hello naming a peer without one is refused and
        counted (``invalid_auth``). A supervisor calls it before it spawns each worker, so
        another process of the same user cannot pass itself off as one."""
        if not isinstance(self._session, HubSession):
            raise BridgeError(f"Bridge.expect() is for the hub; {self.name!r} is a peer")
        if not wire.valid_name(name) or not isinstance(secret, str) or \
                not 0 < len(secret) <= 64:
            raise ValueError(f"expect({name!r}, ...): a peer name and a secret of 1-64 chars")
        self._io.call(self._session.expect, name, secret)

    def forget(self, name: str) -> None:
        """(hub) Drop a peer's record (its desired state included)."""
        session = self._session
        if isinstance(session, HubSession):
            self._io.call(session.forget, name)
