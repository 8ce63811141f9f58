"""The peer's session: hello until welcomed, commands in, state reports and logs out, hub lost.

A peer connects a DEALER (routing id = its name) to the hub's ROUTER, one to 'up' and, if
it mirrors channels, a second DEALER (same routing id) to the hub's 'down' ROUTER.
It says hello when the control handshake succeeds (and
again until welcomed, or when the hub says 'who'); acks each command on receipt and hands it
to the :class:`~multibus.transport.applier.Applier`, once per (epoch, seq); reports each state
change of its bus and each command that failed in it; and forwards its 'log' records
upstream. ``hub.lost`` is published on the
control socket's DISCONNECTED event or a heartbeat timeout; after it the peer closes with
linger 0 (nobody is left to read its last words). Runs on the I/O thread, except
:meth:`PeerSession.note_state`, :meth:`PeerSession.note_failure` and
:meth:`PeerSession.on_log` (any thread).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import zmq

from multibus.transport import wire
from multibus.transport.applier import Applier, wire_state
from multibus.transport.iothread import DATA_HWM, NEVER, retry_interval

__all__ = ["PeerSession"]


class PeerSession:
    """The peer's half of the protocol (see the module docstring)."""

    CONTROL_PARTS = 1  # DEALER: the frame
    DATA_PARTS = 1

    def __init__(self, cfg: Any, io: Any, applier: Applier) -> None:
        self.cfg = cfg
        self.io = io
        self.stats = io.stats
        self.applier = applier
        self.bus = cfg.bus
        self.name: str = cfg.name
        self.retry = retry_interval(cfg.heartbeat)
        self.hub_gone = False  # hub.lost seen: close with linger 0 (nobody reads)
        self._hub_epoch = 0
        self._welcomed = False
        self._hub_seen = 0.0
        self._next_hb = self._next_hello = 0.0
        self._last_cmd: tuple[int, int] = (0, -1)
        self._last_state: object = None
        self._reported: str | None = None
        self._states: collections.deque[str] = collections.deque()  # any thread -> I/O
        self._failures: collections.deque[bytes] = collections.deque()  # 'failed' frames

    # ---------------------------------------------------------------- sockets

    def open(self, io: Any) -> tuple[zmq.Socket, zmq.Socket | None, zmq.Socket, None]:
        ep = self.cfg.endpoints
        control = io.make_socket(zmq.DEALER, "control")
        control.routing_id = self.name.encode()
        control.immediate = 1  # control frames go to a live hub or fail at once
        # A peer watches its control connection only (hub lost, handshake and CURVE
        # failures); two more monitors would cost every worker start and exit.
        down = None  # no channels: nothing to read downstream
        if self.cfg.channels:
            # the hub's 'down' is a ROUTER that sends to each peer by name (fanout.py)
            down = io.make_socket(zmq.DEALER, "down", monitor=False)
            down.routing_id = self.name.encode()
            down.rcvhwm = DATA_HWM
        up = io.make_socket(zmq.DEALER, "up", monitor=False)  # the hub's ROUTER: origin
        up.routing_id = self.name.encode()
        up.sndhwm = DATA_HWM
        control.connect(ep.control)
        if down is not None:
            down.connect(ep.down)
        up.connect(ep.up)
        return control, down, up, None

    def opened(self) -> None:
        self._next_hb = self._next_hello = time.monotonic()
        self.note_state()

    def after_close(self) -> None:
        pass

    # ---------------------------------------------------------------- any thread

    def note_state(self) -> None:
        """Queue a report if the bus state changed since the last look."""
        state = self.bus.state
        if state is not self._last_state:
            self._last_state = state
            self._states.append(wire_state(state))
            self.io.wake()

    def note_failure(self, desired: str | None, error: str) -> None:
        """A command failed here (the applier's ``on_failed``): report it after the state
        reports queued before it."""
        self.note_state()
        self._failures.append(wire.encode("failed", state=desired, error=error))
        self.io.wake()

    def on_log(self, msg: Any = "", level: Any = 20, *args: Any, **kwargs: Any) -> None:
        """The bus's 'log' listener: forward the record upstream; note a state change
        announced by it."""
        first = self.io.outbox.add_log(msg, level)
        self.note_state()
        if first:
            # Logs carry state reports and command results: wake the I/O thread even while
            # it streams (then it only looks every 1 ms), unless a wake-up is already due.
            self.io.wake()

    # ---------------------------------------------------------------- I/O thread

    def data_ready(self) -> bool:
        """Publishes and logs go up only once welcomed: the hub takes a frame on 'up' only
        from a connection naming a peer it knows (``HubSession.from_peer``)."""
        return self._welcomed

    def has_work(self) -> bool:
        return bool(self._states) or bool(self._failures and self._welcomed)

    def before_flush(self) -> None:
        if self._states or self._failures:
            self._send_states()

    def closing(self) -> None:
        self.note_state()
        self._send_states()

    def closed(self) -> None:
        self._send(wire.encode("bye"))

    def on_connected(self) -> None:
        self._send_hello()

    def on_disconnected(self) -> None:
        if self._welcomed:
            self._hub_lost("disconnected")

    def on_data(self, kind: str, msg: dict[str, Any]) -> bool:
        """A non-publish frame on 'down': a sync probe (answered if it names us)."""
        if kind != "sync":
            return False
        if msg["target"] == self.name:
            self._send(wire.encode("ready", token=msg["token"]))
        return True

    def on_control(self, _frame: bytes, kind: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        if kind == "welcome":
            new_hub = msg["epoch"] != self._hub_epoch
            self._hub_epoch = msg["epoch"]
            self._hub_seen = now
            was = self._welcomed
            self._welcomed = True
            self.hub_gone = False
            self.io.outbox.set_frame_limit(min(self.cfg.max_message, msg["max_message"]))
            self.applier.welcome(msg["epoch"], msg["graceful"], new_hub)
            if not was:
                self.io.emit("hub.joined", msg["name"])
        elif kind == "who":
            self._welcomed = False
            self._send_hello()
        elif kind == "hb":
            if msg["epoch"] != self._hub_epoch or not self._welcomed:
                self._send_hello()
            else:
                self._hub_seen = now
                if self.cfg.heartbeat is None and not msg["reply"]:  # a hub using heartbeats
                    self._send(self._hb(reply=True))
        elif kind == "cmd":
            if msg["epoch"] != self._hub_epoch:
                self._send_hello()  # a command from a hub instance we have not met
                return
            self._hub_seen = now
            self._send(wire.encode("ack", epoch=msg["epoch"], seq=msg["seq"]))
            key = (msg["epoch"], msg["seq"])
            last_epoch, last_seq = self._last_cmd
            if key[0] == last_epoch and key[1] <= last_seq:
                return  # already applied (a resend): applied once
            self._last_cmd = key
            self.stats.cmd_received += 1
            self.applier.apply(msg["epoch"], msg["state"], msg["graceful"])
        else:
            self.io.invalid("unexpected", f"{kind!r} frame from the hub")

    def _hb(self, reply: bool) -> bytes:
        """A heartbeat: the hub's epoch as we know it, our bus state, and whether it answers
        one (answers are never answered)."""
        return wire.encode("hb", epoch=self._hub_epoch, state=wire_state(self.bus.state),
                           reply=reply)

    def _send(self, frame: bytes) -> bool:
        try:
            self.io.control.send(frame, zmq.NOBLOCK)
            self.stats.frames_out += 1
            return True
        except zmq.Again:
            self.stats.control_blocked += 1
            return False

    def _send_hello(self) -> None:
        self._next_hello = t = time.monotonic() + self.retry
        self.io.timer_at(t)  # retried until welcomed
        proof = {"secret": self.cfg.secret} if self.cfg.secret else {}
        self._send(wire.encode("hello", name=self.name, pid=os.getpid(), epoch=self.cfg.epoch,
                               state=wire_state(self.bus.state), down=bool(self.cfg.channels),
                               **proof))

    def _hub_lost(self, reason: str) -> None:
        self._welcomed = False
        self.hub_gone = True  # nobody reads our last words: close with linger 0
        self.io.timer_at(self._next_hello)
        self.io.emit("hub.lost", reason)

    def _send_states(self) -> None:
        states = self._states
        while states:
            state = states.popleft()
            if state != self._reported:
                self._reported = state
                if self._welcomed:
                    self._send(wire.encode("state", state=state))
        while self._failures and self._welcomed:  # a command came: we were welcomed
            self._send(self._failures.popleft())

    def tick(self, now: float) -> None:
        """Hub timeout, hello retries, heartbeats; with ``heartbeat=None`` only a pending
        hello sets a timer."""
        hb_ivl = self.cfg.heartbeat
        if hb_ivl is None:
            next_tick = self._next_hb = NEVER
        else:
            next_tick = now + min(self.retry, hb_ivl)
        if hb_ivl is not None and self._welcomed and now - self._hub_seen > self.cfg.peer_timeout:
            self._hub_lost("heartbeat timeout")
        if not self._welcomed:
            if now >= self._next_hello:
                self._send_hello()
            next_tick = min(next_tick, self._next_hello)
        if now >= self._next_hb:
            self._next_hb = now + hb_ivl
            if self._welcomed:
                self._send(self._hb(reply=False))
        self.note_state()
        self.io.next_tick = min(next_tick, self._next_hb)
