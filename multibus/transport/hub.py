"""The hub's session: its peers, their hello/join, commands and acks, and lost peers.

The hub binds three sockets (see ``bridge.py``) and keeps one :class:`PeerLink` per peer
name: who it is, what state it is told to be in, which command it has not acked yet, and
whether it has joined. Everything here runs on the I/O thread; ``Bridge.peers()`` reads the
links under ``HubSession.lock``.

Joining: a peer that reads 'down' (it mirrors channels) joins once a sync probe sent to it on
'down' reached it (so nothing the hub publishes after ``peer.joined`` can miss it); a peer
without channels joins at its hello. Mirrored frames go to each joined peer through the
:class:`~multibus.transport.fanout.Fanout`, on its own pipe and queue: a peer that does not
read is declared slow (``peer.slow``) and dropped for, and never delays anyone else.
Commands are desired state, resent until acked; a peer
that says hello again gets the current desired state. Lost: heartbeat silence, a 'bye', or
(``heartbeat=None``) a control disconnect followed by probes that ROUTER_MANDATORY answers
with EHOSTUNREACH for the gone peer.

Names and keys (CURVE, an allow-list that binds keys to names: see ``CurveConfig``): a
peer's name is its routing id, so every frame on 'control' and 'up' is checked against the
ZAP User-Id of its connection (the client's public key): a peer whose key was allowed under
another name is refused (``name_refused``, warned about rate-limited) and gets no answer.
Without CURVE (ipc: the local workers) nothing is checked and frames are read as before.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import zmq

from multibus.transport import wire
from multibus.transport.applier import wire_state
from multibus.transport.endpoints import Endpoints
from multibus.transport.fanout import Fanout
from multibus.transport.iothread import DATA_HWM, NEVER, retry_interval
from multibus.transport.keys import start_authenticator

__all__ = ["ACTIONS", "HubSession", "PeerLink"]

ACTIONS = {"start": "STARTED", "stop": "STOPPED", "exit": "EXITING", "graceful": None}
SYNC_INTERVAL = 0.01
PROBE_DELAYS = (0.0, 0.1, 0.5)  # heartbeat=None: probe peers after a control disconnect


def nonzero_u63() -> int:
    return random.SystemRandom().getrandbits(63) or 1


class PeerLink:
    """The hub's link to one peer: identity, desired state, pending command, join state.

    Every control frame the hub sends *to this peer* goes through :meth:`send`, the sync
    probe through :meth:`send_sync` (addressed to this peer on 'down'). Its mirrored frames
    go through its queue in the session's :class:`~multibus.transport.fanout.Fanout` once
    it joined; nothing here ever waits behind that queue.
    """

    __slots__ = ("session", "name", "ident", "desired", "graceful", "cmd_seq", "pending",
                 "next_send", "pid", "peer_epoch", "state", "published_state", "connected",
                 "joined", "token", "last_seen", "down", "acked_at", "stuck")

    def __init__(self, session: HubSession, name: str, ident: bytes,
                 desired: str | None = None, graceful: int = 0) -> None:
        self.session = session
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
        self.acked_at = 0.0  # a command acked, its state not reported since (0: none)
        self.stuck: dict[str, str] = {}  # why it looks stuck: 'data' (fanout), 'cmd' (unapplied)

    def send(self, frame: bytes) -> bool:
        """A control frame to this peer; False if not sent (blocked or gone: then lost)."""
        return self.session.send_to(self.ident, frame)

    def send_sync(self) -> None:
        """A sync probe to this peer on 'down': it answers 'ready' once it reads 'down'.
        Not sent (retried by the timer) while its pipe is full or not connected yet."""
        try:
            self.session.io.subs.send_multipart(
                (self.ident, wire.encode("sync", target=self.name, token=self.token)),
                zmq.NOBLOCK,
            )
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                raise

    def send_cmd(self, now: float) -> None:
        """The current desired state; resent by the timer until acked."""
        if not self.connected:
            return
        s = self.session
        frame = wire.encode("cmd", epoch=s.epoch, seq=self.cmd_seq, state=self.desired,
                            graceful=self.graceful)
        if self.send(frame):
            s.stats.cmd_sent += 1
        self.next_send = t = now + s.retry
        s.io.timer_at(t)  # resend until acked (the only timer of an idle hub)

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state, "desired": self.desired,
                "connected": self.connected, "joined": self.joined,
                "last_seen": self.last_seen, **self.session.fanout_info(self.name)}


class HubSession:
    """The hub's half of the protocol, run by the I/O thread (see the module docstring)."""

    CONTROL_PARTS = 2  # ROUTER: routing id + frame
    DATA_PARTS = 2  # 'up' is a ROUTER too: a frame's origin is the connection it came on
    hub_gone = False

    def __init__(self, cfg: Any, io: Any) -> None:
        self.cfg = cfg
        self.io = io
        self.stats = io.stats
        self.epoch: int = cfg.epoch
        self.retry = retry_interval(cfg.heartbeat)
        self.lock = threading.Lock()  # guards links for readers in other threads
        self.links: dict[str, PeerLink] = {}
        self._default_desired: str | None = None
        self._default_graceful = 0
        self._cmd_seq = 0
        self._ack_waiters: list[tuple[Any, dict[str, int]]] = []  # (held Lock, name->seq)
        self._probe_at = 0.0  # look for gone peers (a control pipe disconnected)
        self._probe_start = 0.0
        self._next_hb = 0.0
        self._auth: Any = None
        self._bound: tuple[zmq.Socket, ...] = ()  # control, down, up: what share() binds too
        self.fanout: Fanout | None = None
        self.secrets: dict[str, str] = {}  # name -> the secret its hello must carry
        # (CURVE, some keys bound to a name) User-Id (z85 key) -> the routing id it may use
        # (None: any); the I/O thread calls name_check on each frame of 'control' and 'up'
        self._key_names: dict[str, bytes | None] = {}
        self.name_check: Any = None

    # ---------------------------------------------------------------- sockets

    def open(self, io: Any) -> tuple[zmq.Socket, zmq.Socket, Fanout, zmq.Socket]:
        cfg = self.cfg
        ep = cfg.endpoints
        if cfg.curve is not None:
            self._auth = start_authenticator(io._ctx, cfg.curve.allowed,
                                             lambda: self.stats.report("zap_refused"))
            if cfg.curve.names:
                self._key_names = {k.decode(): None if n is None else n.encode()
                                   for k, n in cfg.curve.key_names().items()}
                self.name_check = self._name_ok
        control = io.make_socket(zmq.ROUTER, "control")
        control.router_mandatory = 1
        # no handover: a second connection naming a connected peer is refused by libzmq, so
        # nobody takes over a live worker's pipe (issue 14); a restarted worker's DEALER
        # reconnects until the dead one's pipe is gone (milliseconds)
        control.router_handover = 0
        down = io.make_socket(zmq.ROUTER, "down")  # per peer: see fanout.py
        down.router_mandatory = 1
        down.router_handover = 0
        down.sndhwm = DATA_HWM
        down.rcvhwm = 1  # peers send nothing here: what a stranger sends is drained
        up = io.make_socket(zmq.ROUTER, "up")  # peers' DEALERs, routing id = their name
        up.router_handover = 0
        up.rcvhwm = DATA_HWM
        control.bind(ep.control)
        down.bind(ep.down)
        up.bind(ep.up)
        resolved = Endpoints(control.last_endpoint.decode(), down.last_endpoint.decode(),
                             up.last_endpoint.decode())
        if resolved != ep:
            cfg.endpoints = resolved
        self._bound = (control, down, up)
        self.fanout = Fanout(down, self.stats, cfg.send_timeout,
                             log=lambda text, level: io.emit(
                                 "log", f"multibus bridge {cfg.name!r}: {text}", level),
                             on_slow=self._slow)
        return control, up, self.fanout, down

    def share(self, ep: Endpoints, uid: int, gid: int) -> None:
        """(I/O thread) Listen on ``ep`` too, for peers running as ``uid``: each socket file
        is made theirs and 0600, so only they (and we) can connect; their hello still has to
        prove its secret."""
        for sock, url, path in zip(self._bound, ep.urls(), ep.ipc_paths(), strict=True):
            sock.bind(url)
            os.chown(path, uid, gid)
            os.chmod(path, 0o600)

    def opened(self) -> None:
        self._next_hb = time.monotonic()

    def _name_ok(self, ident: bytes, frame: zmq.Frame, label: str) -> bool:
        """(CURVE) Whether the connection a frame came on may use the name ``ident``: its
        key (the ZAP User-Id) is allowed under that name, or under none. Else the frame is
        refused, counted, warned about (rate-limited), and not answered; a link of that
        name loses its connection (the routing id is the other peer's now: the ROUTER hands
        a name to one connection at a time)."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:  # no ZAP User-Id: not a CURVE connection we let in
            user = ""
        bound = self._key_names.get(user, b"")
        if bound is None or bound == ident:
            return True
        self.stats.name_refused += 1
        name = ident.decode("ascii", "replace")
        self.io.warn("name", f"refused a {label} frame from a peer calling itself {name!r} "
                     f"whose CURVE key was allowed as {bound.decode()!r}" if bound else
                     f"refused a {label} frame from a peer calling itself {name!r} without "
                     "an allowed CURVE key", 30)
        with self.lock:
            link = self.links.get(name)
        if link is not None and link.connected and link.ident == ident:
            self._lose(link, "disconnected")
        return False

    def after_close(self) -> None:
        if self._auth is not None:
            self._auth.stop()

    def has_work(self) -> bool:
        return False

    def data_ready(self) -> bool:
        return True

    def before_flush(self) -> None:
        fanout = self.fanout
        if fanout.blocked:
            self.io.timer_at(fanout.pump(time.monotonic()))

    def closing(self) -> None:
        pass

    def closed(self) -> None:
        pass

    def on_connected(self) -> None:
        pass

    # ---------------------------------------------------------------- frames in

    def on_control(self, ident: bytes, kind: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "hello":
            name = msg["name"]
            if ident != name.encode():
                self.io.invalid("unexpected",
                                f"hello from routing id {ident[:64]!r} naming {name!r}")
                return
            self._hello(ident, name, msg, now)
            return
        name = ident.decode("ascii", "replace")
        with self.lock:
            link = self.links.get(name)
        if link is None or not link.connected or link.ident != ident:
            if kind != "bye":
                self.send_to(ident, wire.encode("who"))
            return
        link.last_seen = now
        if kind == "hb":
            if msg["epoch"] != self.epoch:
                link.send(wire.encode("who"))
                return
            if self.cfg.heartbeat is None and not msg["reply"]:
                # a peer that uses heartbeats times us out: answer (never an answer, or two
                # sides without heartbeats would bounce a probe's hb between them forever)
                link.send(self._hb(reply=True))
            self._state(link, msg["state"])
        elif kind == "state":
            self._state(link, msg["state"])
        elif kind == "failed":
            self.io.emit("peer.failed", link.name, msg["state"], msg["error"])
        elif kind == "ack":
            if msg["epoch"] == self.epoch and msg["seq"] >= link.cmd_seq:
                if link.pending and link.desired is not None and link.state != link.desired:
                    # its main thread applies it: a state report must follow (see tick)
                    link.acked_at = now
                    self.io.timer_at(now + self.cfg.send_timeout)
                link.pending = False
            if self._ack_waiters and msg["epoch"] == self.epoch:
                self._acked(link.name, msg["seq"])
        elif kind == "ready":
            if msg["token"] == link.token and not link.joined:
                self._join(link)
        elif kind == "bye":
            self._lose(link, "exited" if link.state == "EXITING" else "left")
        else:
            self.io.invalid("unexpected", f"{kind!r} frame from peer {name!r}")

    def from_peer(self, ident: bytes, kind: str, msg: dict[str, Any]) -> bool:
        """A frame on 'up' from connection ``ident``: its origin must be the peer of that
        name, which said hello (and proved its secret, if one is expected; its last words
        may come after its 'bye'); else dropped, counted."""
        name = ident.decode("ascii", "replace")
        link = self.links.get(name)
        if link is not None and link.pid and msg["origin"] == name:
            return True
        self.io.invalid("origin", f"{kind!r} frame on 'up' from connection {ident[:64]!r} "
                        f"with origin {msg['origin']!r}")
        return False

    def on_data(self, kind: str, msg: dict[str, Any]) -> bool:
        """A non-publish frame on 'up': a peer's 'log' records."""
        if kind != "log":
            return False
        self.stats.logs_received += len(msg["msgs"])
        self.io.dispatcher.put(("logs", msg["origin"], msg["msgs"]))
        return True

    def on_disconnected(self) -> None:
        if self.cfg.heartbeat is None:
            # no heartbeat will notice: probe every peer now (and a bit later, as the ROUTER
            # may drop the pipe after the event), EHOSTUNREACH names the gone one
            now = time.monotonic()
            self._probe_start = self._probe_at = now
            self.io.next_tick = now

    def relay_needed(self, origin: str) -> bool:
        """Relay a peer's batch down unless relaying is off or the origin is the only peer
        connected."""
        if not self.cfg.relay:
            return False
        with self.lock:
            for link in self.links.values():
                if link.connected and link.name != origin:
                    return True
        return False

    # ---------------------------------------------------------------- peers

    def _hb(self, reply: bool) -> bytes:
        return wire.encode("hb", epoch=self.epoch, state=wire_state(self.cfg.bus.state),
                           reply=reply)

    def _new_link(self, name: str, ident: bytes) -> PeerLink:
        """(under the lock) A link that starts from the current default desired state."""
        link = self.links[name] = PeerLink(self, name, ident, desired=self._default_desired,
                                           graceful=self._default_graceful)
        return link

    def _hello(self, ident: bytes, name: str, msg: dict[str, Any], now: float) -> None:
        if self.secrets:
            import hmac  # here: a worker importing the bridge skips OpenSSL's _hashlib (~3 ms)

            expected = self.secrets.get(name)
            if expected is None or not hmac.compare_digest(
                    msg.get("secret", "").encode(), expected.encode()):
                self.io.invalid("auth", f"hello naming {name!r} without its secret "
                                "(not the process spawned as it): ignored")
                return
        with self.lock:
            link = self.links.get(name)
            if link is None:
                link = self._new_link(name, ident)
                if link.desired is not None:
                    self._cmd_seq += 1
                    link.cmd_seq = self._cmd_seq
            fresh = link.peer_epoch != msg["epoch"] or not link.connected
            link.ident = ident
            link.pid = msg["pid"]
            link.peer_epoch = msg["epoch"]
            link.down = msg["down"]
            link.connected = True
            link.last_seen = now
            if fresh:
                link.joined = False
                link.token = nonzero_u63()
        if fresh:
            self.fanout.remove(name)
            link.acked_at = 0.0
            self._stuck(name, "cmd", "")
        self._state(link, msg["state"])
        link.send(wire.encode("welcome", name=self.cfg.name, epoch=self.epoch,
                              graceful=link.graceful, max_message=self.cfg.max_message))
        if link.cmd_seq:
            link.pending = True
            link.send_cmd(now)
        if not link.joined:
            if link.down:
                self._sync(link)
            else:
                self._join(link)

    def _sync(self, link: PeerLink) -> None:
        self.io.timer_at(time.monotonic() + SYNC_INTERVAL)
        link.send_sync()

    def _join(self, link: PeerLink) -> None:
        with self.lock:
            link.joined = True
        if link.down:
            self.fanout.add(link.name, link.ident)
        self.io.emit("peer.joined", link.name, link.pid)
        if link.state is not None:
            link.published_state = link.state
            self.io.emit("peer.state", link.name, link.state)

    def _state(self, link: PeerLink, state: str) -> None:
        if (link.acked_at or link.stuck) and (state != link.state or state == link.desired):
            # its main thread moved (a heartbeat's unchanged state proves nothing: the I/O
            # thread sends it)
            link.acked_at = 0.0
            self._stuck(link.name, "cmd", "")
        if state != link.state:
            with self.lock:
                link.state = state
        if link.joined and state != link.published_state:
            link.published_state = state
            self.io.emit("peer.state", link.name, state)

    def _lose(self, link: PeerLink, reason: str) -> None:
        if not link.connected:
            return
        with self.lock:
            link.connected = False
            link.joined = False
            link.pending = link.cmd_seq > 0
        self.fanout.remove(link.name)
        self.io.emit("peer.lost", link.name, reason)

    def send_to(self, ident: bytes, frame: bytes) -> bool:
        """A control frame to a routing id (a link's, or an unknown one told 'who')."""
        try:
            self.io.control.send_multipart((ident, frame), zmq.NOBLOCK)
            self.stats.frames_out += 1
            return True
        except zmq.Again:
            self.stats.control_blocked += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                with self.lock:
                    link = self.links.get(ident.decode("ascii", "replace"))
                if link is not None and link.ident == ident:
                    self._lose(link, "disconnected")
                return False
            raise

    # ---------------------------------------------------------------- calls from Bridge

    def command(self, action: str, names: list[str] | None, done: Any | None) -> None:
        """Set the desired state of ``names`` (None: every peer, and later ones); release
        ``done`` (a held lock) once each targeted connected peer acked."""
        desired = ACTIONS[action]
        now = time.monotonic()
        with self.lock:
            if names is None:
                if desired is None:
                    self._default_graceful += 1
                else:
                    self._default_desired = desired
                targets = list(self.links.values())
            else:
                targets = [self.links.get(n) or self._new_link(n, n.encode()) for n in names]
        for link in targets:
            self._cmd_seq += 1
            link.cmd_seq = self._cmd_seq
            if desired is None:
                link.graceful += 1
            else:
                with self.lock:
                    link.desired = desired
            link.pending = True
            link.send_cmd(now)
        if done is not None:
            needed = {link.name: link.cmd_seq for link in targets if link.connected}
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

    def expect(self, name: str, secret: str) -> None:
        """From now on a hello naming ``name`` must carry ``secret`` (and, once any secret is
        expected, a hello naming a peer without one is refused)."""
        self.secrets[name] = secret

    def forget(self, name: str) -> None:
        with self.lock:
            self.links.pop(name, None)
        self.fanout.remove(name)

    def _slow(self, name: str, reason: str) -> None:
        """(Fanout) ``name``'s slow episode started (``reason``) or ended ('')."""
        self._stuck(name, "data", reason)

    def _stuck(self, name: str, kind: str, reason: str) -> None:
        """Set (``reason``) or clear ('') one cause of ``name`` looking stuck; publish
        ``peer.slow(name, why)`` when the answer changes ('' once no cause is left)."""
        link = self.links.get(name)
        if link is None:
            return
        before = "; ".join(link.stuck.values())
        if reason:
            link.stuck[kind] = reason
        else:
            link.stuck.pop(kind, None)
        after = "; ".join(link.stuck.values())
        if after != before:
            self.io.emit("peer.slow", name, after)

    def fanout_info(self, name: str) -> dict[str, Any]:
        """(any thread) ``slow``, ``dropped`` and ``queued`` of a joined peer's mirrored
        frames (ints and a bool, read as they are: the I/O thread writes them)."""
        fanout = self.fanout
        return fanout.info(name) if fanout is not None else {}

    def peers(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {link.name: link.info() for link in self.links.values()}

    # ---------------------------------------------------------------- timers

    def tick(self, now: float) -> None:
        """Heartbeats, timeouts, command resends, sync probes, disconnect probes, and the
        retry of a peer's blocked queue (:class:`Fanout`). With ``heartbeat=None`` only what
        is pending sets a timer: an idle hub sleeps."""
        io = self.io
        hb_ivl = self.cfg.heartbeat
        if hb_ivl is None:
            next_tick = self._next_hb = NEVER
        else:
            next_tick = now + min(self.retry, hb_ivl)
        syncing = False
        with self.lock:
            links = list(self.links.values())
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
            hb = self._hb(reply=False)
        for link in links:
            if not link.connected:
                continue
            if hb_ivl is not None and now - link.last_seen > self.cfg.peer_timeout:
                self._lose(link, "heartbeat timeout")
                continue
            if beat or probe:
                # ROUTER_MANDATORY: a peer whose pipe is gone fails -> 'disconnected'
                link.send(hb)
                if not link.connected:
                    continue
            if link.acked_at:
                if now - link.acked_at >= self.cfg.send_timeout:
                    link.acked_at = 0.0
                    self._stuck(link.name, "cmd", f"{link.desired} not applied "
                                f"{self.cfg.send_timeout:g}s after the command was received "
                                "(its main thread does not answer)")
                else:
                    next_tick = min(next_tick, link.acked_at + self.cfg.send_timeout)
            if link.pending:
                if now >= link.next_send:
                    self.stats.cmd_retries += 1
                    link.send_cmd(now)
                next_tick = min(next_tick, link.next_send)
            if not link.joined and link.connected and link.down:
                syncing = True
                self._sync(link)
        if syncing:
            next_tick = min(next_tick, now + SYNC_INTERVAL)
        fanout = self.fanout
        if fanout is not None and fanout.blocked:  # a queue's retry (before_flush set it)
            next_tick = min(next_tick, fanout.next_retry)
        io.next_tick = min(next_tick, self._next_hb)
