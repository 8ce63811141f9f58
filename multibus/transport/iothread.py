"""The I/O thread: the one thread that owns a bridge's sockets and frames.

One daemon thread per bridge creates, polls, reads, writes and closes every ZeroMQ socket of
it (zmq sockets are not thread-safe). Other threads hand it work through the
:class:`~multibus.wakeup.CallQueue` (commands, forget) or the outbox's deques (publishes,
logs), and wake its ``poll()`` through the one :class:`~multibus.wakeup.Wakeup`.

It is role-agnostic: the role's session (``hub.HubSession`` or ``peer.PeerSession``) sets
up the sockets, handles control frames, monitor events and timers (and, where it has a
``name_check``, vets each frame's sender by its connection's ZAP User-Id: read as
``zmq.Frame`` objects only then, so the ipc path is unchanged). What is the same for both
roles lives here: validating every frame, mirrored batches in (sequence gaps, no echo, relay)
and out (the outbox), pausing input while the dispatch thread is behind, and closing with a
bounded LINGER.

Errors: a frame that fails validation is the other side's fault: counted, and warned about
rate-limited (a hostile peer must not flood the log). Any other exception in this thread is
a bug: counted as ``internal_errors`` and logged with its traceback, every time; the thread
goes on (it must survive anything).
"""

from __future__ import annotations

import functools
import struct
import threading
import time
from typing import Any

import zmq

from multibus.transport import wire
from multibus.transport.dispatch import DISPATCH_BACKLOG, Dispatcher
from multibus.transport.keys import apply_client, apply_server
from multibus.transport.outbox import PENDING_FRAMES
from multibus.transport.stats import BridgeStats, RateLimit
from multibus.wakeup import CallQueue, Wakeup

__all__ = ["NEVER", "IOThread", "retry_interval"]

DATA_HWM = 128  # frames (each up to max_message) queued per data pipe
LINGER_MS = 1000
PAUSED_POLL_MS = 20  # input paused for the dispatch thread: look again at least this often
SEQ_TABLE = 1024  # (origin, epoch) pairs remembered for gap detection
NEVER = float("inf")  # no timer due (heartbeat=None and nothing pending): poll without timeout

MONITOR_EVENTS = (
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


def retry_interval(heartbeat: float | None) -> float:
    """How soon an unanswered hello or command is sent again."""
    return 0.25 if heartbeat is None else max(0.05, min(0.25, heartbeat / 2))


def monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """(event, value) of a socket-monitor message: zmq.utils.monitor.parse_monitor_message
    without its import, which pulls in asyncio (~30 ms of every process's start-up)."""
    if len(frames) != 2 or len(frames[0]) != _MONITOR_HEAD.size:
        raise ValueError(f"not a socket-monitor message: {frames!r:.200}")
    return _MONITOR_HEAD.unpack(frames[0])


class IOThread:
    """Owns the sockets of one bridge (see the module docstring).

    ``cfg`` is the Bridge, read for its settings. The façade sets ``session`` and
    ``outbox`` before :meth:`start`. Attributes other threads read: ``sleeping`` (wake me),
    ``stop_requested``, ``thread``.
    """

    def __init__(self, cfg: Any, stats: BridgeStats, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.stats = stats
        self.dispatcher = dispatcher
        self.session: Any = None
        self.outbox: Any = None
        self.on_closed: Any = None  # called by this thread once its sockets are closed
        self.calls = CallQueue(wake=self.wake, on_error=self._call_failed)
        self.thread: threading.Thread | None = None
        self.sleeping = False
        self.stop_requested = False
        self.abandoned = False  # close with linger 0, whatever happens
        self.next_tick = 0.0
        self._wakeup: Wakeup | None = None
        self._wake_lock = threading.Lock()  # never write to a closed (maybe reused) fd
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._rate = RateLimit()
        self._ctx: zmq.Context | None = None
        self._sockets: list[zmq.Socket] = []
        self._monitors: dict[Any, str] = {}

    # ---------------------------------------------------------------- any thread

    def start(self) -> BaseException | None:
        """Start the thread; return once the sockets are open, with the error if they
        could not be (the thread has ended then)."""
        self._wakeup = Wakeup()
        self.thread = threading.Thread(
            target=self._main, name=f"bridge-io-{self.cfg.name}", daemon=True
        )
        self.thread.start()
        self._ready.wait()
        if self._open_error is not None:
            self.thread.join(5)
        return self._open_error

    def wake(self) -> None:
        with self._wake_lock:
            if self._wakeup is not None:
                self._wakeup.wake()

    def call(self, func: Any, *args: Any) -> None:
        """Run ``func(*args)`` in the I/O thread, soon."""
        self.calls.call_soon(functools.partial(func, *args))

    def stop(self) -> None:
        self.stop_requested = True
        self.wake()

    def release(self) -> None:
        """Give back the wake-up pipe (after the thread closed its sockets)."""
        with self._wake_lock:
            w, self._wakeup = self._wakeup, None
        if w is not None:
            w.close()

    # ---------------------------------------------------------------- this thread

    def emit(self, channel: str, *args: Any) -> None:
        self.dispatcher.emit(channel, *args)

    def invalid(self, reason: str, detail: str) -> None:
        """A frame from the other side failed validation: count it, warn rate-limited."""
        self.stats.count_invalid(reason)
        self.warn(reason, f"dropped invalid frame: {detail}", 30)

    def warn(self, key: str, text: str, level: int) -> None:
        """A warning about peer-caused input: the first 3 of a kind, then powers of two."""
        suffix = self._rate(key)
        if suffix is not None:
            self.emit("log", f"multibus bridge {self.cfg.name!r}: {text}{suffix}", level)

    def internal_error(self, what: str) -> None:
        """(in an except block) A bug: count it and log it with its traceback, every time."""
        import traceback  # only on a bug: a worker starts without it

        self.stats.internal_errors += 1
        self.emit("log", f"multibus bridge {self.cfg.name!r}: {what}\n"
                  f"{traceback.format_exc()}", 40)

    def _call_failed(self, func: Any, exc: BaseException) -> None:
        self.internal_error(f"I/O thread error in {func!r}: {type(exc).__name__}: {exc}")

    def timer_at(self, t: float) -> None:
        """Make sure the loop looks at the timers (``session.tick``) by ``t``. The tick then
        sets ``next_tick`` afresh from what is pending: a timer set here must be one that the
        session's ``tick`` counts too, or it is forgotten after one tick."""
        if t < self.next_tick:
            self.next_tick = t

    def _main(self) -> None:
        try:
            self._open()
        except BaseException as exc:  # noqa: BLE001 - re-raised in subscribe()
            self._open_error = exc
            self._closed()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self.stop_requested:
                try:
                    self._loop_once()
                except zmq.ContextTerminated:
                    break
                except Exception as exc:  # noqa: BLE001 - never die: count, log, go on
                    self.internal_error(f"I/O thread error: {type(exc).__name__}: {exc}")
                    time.sleep(0.01)
            self._flush_on_close()
        finally:
            self._closed()

    def _closed(self) -> None:
        self._close_sockets()
        self.release()
        if self.on_closed is not None:
            self.on_closed()

    def make_socket(self, kind: int, label: str, monitor: bool = True) -> zmq.Socket:
        """A socket with the bridge's limits, heartbeats and CURVE role (for the session)."""
        cfg = self.cfg
        s = self._ctx.socket(kind)
        self._sockets.append(s)
        s.linger = LINGER_MS
        s.maxmsgsize = cfg.max_message
        if cfg.heartbeat is not None:  # none: libzmq's I/O thread then has no idle timers
            timeout_ms = int(cfg.peer_timeout * 1000)
            s.setsockopt(zmq.HEARTBEAT_IVL, int(cfg.heartbeat * 1000))
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
            s.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)
        s.reconnect_ivl = 50
        s.reconnect_ivl_max = 1000
        if cfg.curve is not None:
            if cfg.role == "hub":
                apply_server(s, cfg.curve.keys)
            else:
                assert cfg.curve.server_public is not None
                apply_client(s, cfg.curve.keys, cfg.curve.server_public)
        if monitor:
            mon = s.get_monitor_socket(MONITOR_EVENTS)
            self._monitors[mon] = label
        return s

    def _open(self) -> None:
        self._ctx = zmq.Context()
        session = self.session
        # control: the session's; data_in: mirrored frames in (None: nothing to read);
        # data_out: frames out (the hub: its Fanout); subs: the hub's 'down' ROUTER, drained
        self.control, self.data_in, self.data_out, self.subs = session.open(self)
        poller = self._poller = zmq.Poller()
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        if self.subs is not None:
            poller.register(self.subs, zmq.POLLIN)
        self._reading_data = False
        self._set_data_reading(True)
        self._seqs: dict[tuple[str, int], int] = {}
        self._own_prefix = wire.origin_prefix("pub", self.cfg.name)
        self._hub = self.cfg.role == "hub"
        # (hub, CURVE with names bound to keys) may this connection use this name?
        self._name_check = getattr(session, "name_check", None)
        self.next_tick = time.monotonic()
        session.opened()

    def _set_data_reading(self, on: bool) -> None:
        if on != self._reading_data:
            if self.data_in is None:
                pass  # a peer without channels: nothing to read
            elif on:
                self._poller.register(self.data_in, zmq.POLLIN)
            else:
                self._poller.unregister(self.data_in)
            self._reading_data = on
            self.dispatcher.input_paused = not on

    def _loop_once(self) -> None:
        now = time.monotonic()
        session = self.session
        outbox = self.outbox
        calls = self.calls
        if now >= self.next_tick:
            session.tick(now)
        ready = session.data_ready()  # a peer sends nothing up before the hub knows it
        if ready and (outbox.pending or now < outbox.streaming_until):
            # A stream is flowing (or a send is blocked): look again within 1 ms without
            # asking publishers to wake us. Waking costs them a syscall that also hands us
            # the GIL after every message, which would shrink batches to a few messages.
            timeout = 0 if calls or session.has_work() else 1
        else:
            nt = self.next_tick
            timeout = -1 if nt == NEVER else max(0, int((nt - now) * 1000) + 1)
            self.sleeping = True  # from here on publishers wake us; then re-check the queues
            if calls or session.has_work() or (ready and (outbox.out or outbox.logs)):
                timeout = 0
            elif not self._reading_data and not 0 <= timeout <= PAUSED_POLL_MS:
                timeout = PAUSED_POLL_MS  # the dispatch thread wakes us; this is a backstop
        events = self._poller.poll(timeout)
        self.sleeping = False
        if calls:  # commands first: a command is sent before a batch of input is read
            calls.run_due()
        for sock, _ in events:
            if sock is self.control:
                self._recv_control()
            elif sock is self.data_in:
                self._recv_data()
            elif sock is self.subs:  # hub 'down': peers send nothing there; drained
                self._drain(sock)
            elif sock in self._monitors:
                self._recv_monitor(sock)
            else:  # the wake-up pipe
                self._wakeup.drain()
        if calls:
            calls.run_due()
        session.before_flush()
        if ready or session.data_ready():
            outbox.flush(self.data_out)
        self.stats.fold()
        self._set_data_reading(
            self.dispatcher.backlog < DISPATCH_BACKLOG and len(outbox.pending) < PENDING_FRAMES
        )
        outbox.room_made()

    # -- receiving

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(256):
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _recv_control(self) -> None:
        sock = self.control
        session = self.session
        parts = session.CONTROL_PARTS
        outbox = self.outbox
        check = self._name_check
        for _ in range(256):
            try:
                if check is None:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                else:  # frames, to read their connection's User-Id
                    zframes = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    frames = [f.bytes for f in zframes]
            except zmq.Again:
                return
            self.stats.frames_in += 1
            if len(frames) != parts:
                self.invalid("frames", f"control message of {len(frames)} frames")
                continue
            if check is not None and not check(frames[0], zframes[-1], "control"):
                continue
            try:
                kind, msg = wire.decode(frames[-1], outbox.frame_limit)
            except wire.WireError as exc:
                self.invalid(exc.reason, str(exc))
                continue
            session.on_control(frames[0], kind, msg)

    def _recv_data(self) -> None:
        sock = self.data_in
        st = self.stats
        disp = self.dispatcher
        outbox = self.outbox
        session = self.session
        parts = session.DATA_PARTS
        check = self._name_check
        for _ in range(64):
            if disp.put_count - disp.done >= DISPATCH_BACKLOG or \
                    len(outbox.pending) >= PENDING_FRAMES:
                return
            try:
                if check is None:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                else:
                    zframes = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    frames = [f.bytes for f in zframes]
            except zmq.Again:
                return
            st.frames_in += 1
            if len(frames) != parts:
                self.invalid("frames", f"data message of {len(frames)} frames")
                continue
            if check is not None and not check(frames[0], zframes[-1], "up"):
                continue
            frame = frames[-1]
            if frame.startswith(self._own_prefix, 1):
                st.own_skipped += 1
                continue  # our own publishes, relayed by the hub to everyone: never echo
            try:
                kind, msg = wire.decode(frame, outbox.frame_limit)
            except wire.WireError as exc:
                self.invalid(exc.reason, str(exc))
                continue
            if parts == 2 and not session.from_peer(frames[0], kind, msg):
                continue  # (hub) not what the connection it came on may say: counted
            if kind == "pub":
                self._recv_pub(frame, msg)
            elif not session.on_data(kind, msg):
                where = "up" if self._hub else "down"
                self.invalid("unexpected", f"{kind!r} frame on the {where} socket")

    def _recv_pub(self, frame: bytes, msg: dict[str, Any]) -> None:
        origin = msg["origin"]
        if origin == self.cfg.name:
            return  # our own publish relayed back by the hub: never echo
        runs = msg["runs"]
        n = 0
        for run in runs:
            n += len(run[2])
        key = (origin, msg["epoch"])
        seq = msg["seq"]
        seqs = self._seqs
        st = self.stats
        expected = seqs.get(key)
        if expected is not None and seq != expected:
            if seq < expected:
                st.stale += 1
                self.warn("stale", f"stale batch from {origin!r} (seq {seq} < {expected})", 30)
                return
            lost = seq - expected
            st.gaps += 1
            st.lost += lost
            self.emit(
                "log",
                f"multibus bridge {self.cfg.name!r}: gap of {lost} messages from {origin!r} "
                f"(seq {expected}..{seq - 1} lost)",
                30,
            )
        elif expected is None:
            if len(seqs) >= SEQ_TABLE:
                del seqs[next(iter(seqs))]
        seqs[key] = seq + n
        st.received += n
        if self._hub and self.session.relay_needed(origin):
            self.outbox.pending.append((frame, n))  # relay as is to the other peers
            st.relayed += n
        self.dispatcher.put(("pub", runs, origin))

    def _recv_monitor(self, mon: zmq.Socket) -> None:
        label = self._monitors[mon]
        st = self.stats
        for _ in range(64):
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ev = monitor_event(frames)[0]  # a bad one is a bug: the loop logs it, every time
            if ev & _HANDSHAKE_FAILED:
                st.handshake_failed += 1
                if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    who = "a client" if self._hub else "the hub"
                    self.warn("auth", f"CURVE authentication with {who} failed on the "
                              f"{label} socket; check the keys and the allow-list", 40)
                else:
                    self.warn("handshake", f"ZMTP handshake failed on the {label} socket "
                              "(not a ZeroMQ peer, or a broken one)", 30)
            elif ev == zmq.EVENT_DISCONNECTED:
                st.disconnects += 1
                if label == "control":
                    self.session.on_disconnected()
            elif ev == zmq.EVENT_ACCEPTED:
                st.accepted += 1
            elif ev == zmq.EVENT_HANDSHAKE_SUCCEEDED and label == "control":
                self.session.on_connected()

    # -- closing

    def _flush_on_close(self) -> None:
        """Last words, bounded: queued publishes/logs/states, then the session's goodbye."""
        deadline = time.monotonic() + min(self._linger_ms() / 1000, self.cfg.send_timeout)
        self.session.closing()
        self.outbox.flush_until(self.data_out, deadline)
        self.session.closed()
        self.stats.fold()

    def _linger_ms(self) -> int:
        """LINGER for closing: 0 when nobody reads our last words (abandoned, or a peer
        whose hub is lost: a dead ipc/tcp peer would only make us wait); else LINGER_MS."""
        return 0 if self.abandoned or self.session.hub_gone else LINGER_MS

    def _close_sockets(self) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        for s in self._sockets:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
        for mon in list(self._monitors):
            mon.close(linger=0)
        linger = self._linger_ms()
        for s in self._sockets:
            s.close(linger=linger)
        self.session.after_close()
        ctx.term()
        self._ctx = None

