"""The outbox: mirrored publishes (and a peer's logs) on their way to the data socket.

Publisher threads pack each publish in the mirror listener (so a bad argument raises there)
and append it to a deque; the I/O thread packs the queue into batch frames with sequence
numbers per (origin, epoch) and sends them without ever blocking: on EAGAIN a frame stays
pending and is retried, and after ``send_timeout`` seconds it is dropped, counted and logged.
A publisher blocks (up to ``send_timeout``) while ``max_queue`` messages wait.

This is the hot path: one closure per channel, a deque, and whole batches per send.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from multibus.transport import wire
from multibus.transport.stats import BridgeStats

__all__ = ["PENDING_FRAMES", "Outbox", "ThreadState"]

PENDING_FRAMES = 16  # frames waiting for a socket before we stop building/reading more
STREAM_GAP = 0.02  # s: a batch this soon after the previous one is a stream (see flush)


class BridgeError(RuntimeError):
    """The bridge could not do what was asked (bind, connect, queue a message)."""


class ThreadState(threading.local):
    """Per-thread state shared by the mirror listeners and the dispatch thread."""

    remote: str | None = None  # channel this thread is dispatching from the wire (no echo)
    origin: str | None = None  # ... and the process that published it
    packer: msgpack.Packer | None = None


class Outbox:
    """Queued publishes/logs and the frames built from them (see the module docstring).

    ``out`` and ``logs`` are appended by any thread and drained by the I/O thread, which
    owns everything else. ``io`` is the I/O thread (its ``sleeping``, ``wake``,
    ``stop_requested`` and ``thread``); ``emit`` publishes a warning on the local bus.
    """

    def __init__(self, cfg: Any, stats: BridgeStats, tls: ThreadState, io: Any,
                 emit: Callable[..., None]) -> None:
        self.name: str = cfg.name
        self.epoch: int = cfg.epoch
        self.hub = cfg.role == "hub"
        self.max_queue: int = cfg.max_queue
        self.send_timeout: float = cfg.send_timeout
        self.frame_limit: int = cfg.max_message
        self.limit = wire.entry_limit(self.frame_limit)  # read by publisher threads
        self.stats = stats
        self.tls = tls
        self.io = io
        self.emit = emit
        self.out: collections.deque[tuple[str, bool, bytes]] = collections.deque()
        self.logs: collections.deque[bytes] = collections.deque()
        self.pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self.pending_since = 0.0
        self.seq = 0
        self.streaming_until = 0.0  # I/O thread: until then, poll every 1 ms, no wake-ups
        self._last_batch = float("-inf")
        self._room = threading.Condition()
        self.waiting_room = 0

    def set_frame_limit(self, limit: int) -> None:
        """(I/O thread) The other side accepts frames up to ``limit`` bytes."""
        self.frame_limit = limit
        self.limit = wire.entry_limit(limit)

    # ---------------------------------------------------------------- publisher threads

    def mirror_listener(self, channel: str) -> Callable[..., None]:
        """The bus listener that sends ``channel``'s publishes to the other side."""
        tls = self.tls
        out = self.out
        io = self.io
        max_queue = self.max_queue
        pack = wire.pack_entry

        def mirror(*args: Any, **kwargs: Any) -> None:
            if tls.remote == channel:
                return  # this publish came from the wire: do not send it back
            packer = tls.packer
            if packer is None:
                packer = tls.packer = msgpack.Packer()
            try:
                data = pack(packer, channel, args, kwargs, self.limit)
            except (TypeError, ValueError):
                self.stats.report("refused")
                raise
            out.append((channel, bool(kwargs), data))
            if len(out) > max_queue:
                self._wait_for_room(channel)
            if io.sleeping:
                io.wake()

        mirror.__name__ = f"mirror_{channel}"
        mirror.__qualname__ = f"Bridge.mirror[{channel}]"
        return mirror

    def _wait_for_room(self, channel: str) -> None:
        io = self.io
        if io.stop_requested or threading.current_thread() is io.thread:
            return
        deadline = time.monotonic() + self.send_timeout
        with self._room:
            self.waiting_room += 1
            try:
                while len(self.out) > self.max_queue // 2 and not io.stop_requested:
                    io.wake()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BridgeError(
                            f"bridge {self.name!r}: {len(self.out)} mirrored messages queued "
                            f"for {self.send_timeout}s (publish on {channel!r}); the other side "
                            "is not reading; publish less or raise max_queue"
                        )
                    self._room.wait(min(left, 0.05))
            finally:
                self.waiting_room -= 1

    def add_log(self, msg: Any, level: Any) -> bool:
        """(peer, any thread) Queue a 'log' record; True if it is the only one queued."""
        packer = self.tls.packer
        if packer is None:
            packer = self.tls.packer = msgpack.Packer()
        logs = self.logs
        logs.append(wire.pack_log(packer, msg, level, self.limit))
        return len(logs) == 1

    # ---------------------------------------------------------------- I/O thread

    def room_made(self) -> None:
        """Let blocked publishers go on once the queue is down to half."""
        if self.waiting_room and len(self.out) <= self.max_queue // 2:
            with self._room:
                self._room.notify_all()

    def _build_frames(self) -> None:
        """Pack queued publishes (and peer logs) into batch frames up to the frame limit;
        consecutive publishes on one channel (with or without kwargs) share a run."""
        limit = self.frame_limit - wire.FRAME_OVERHEAD
        pending = self.pending
        q = self.out
        st = self.stats
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
            pending.append((wire.encode_pub(self.name, self.epoch, self.seq, runs), count))
            self.seq += count
            st.sent += count
        logs = self.logs
        while logs and not self.hub and len(pending) < PENDING_FRAMES:
            batch: list[bytes] = []
            size = 0
            while logs and len(batch) < wire.MAX_BATCH:
                size += len(logs[0])
                if size > limit and batch:
                    break
                batch.append(logs.popleft())
            st.logs_sent += len(batch)
            pending.append((wire.encode_logs(self.name, batch), 0))

    def flush(self, sock: Any) -> None:
        """Build frames from what is queued and send what ``sock`` takes now (the hub: hand
        them all to its :class:`~multibus.transport.fanout.Fanout`)."""
        if self.out or self.logs:
            self._build_frames()
            # a second batch within STREAM_GAP: a stream is flowing, poll for the next
            # instead of being woken per message; a lone batch (a worker's start, a state
            # change) goes back to sleep at once, not through 20 polls of 1 ms
            now = time.monotonic()
            if now - self._last_batch < STREAM_GAP:
                self.streaming_until = now + STREAM_GAP
            self._last_batch = now
        elif self.streaming_until:
            self.streaming_until = 0.0  # a poll found nothing new: the stream paused
        pending = self.pending
        if not pending:
            return
        if self.hub:  # the hub's Fanout (fanout.py): per-peer queues, it never blocks
            while pending:
                sock.deliver(*pending.popleft())
            return
        st = self.stats
        while pending:
            frame, n = pending[0]
            try:
                sock.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
            except zmq.Again:
                now = time.monotonic()
                st.retries += 1
                if not self.pending_since:
                    self.pending_since = now
                elif now - self.pending_since > self.send_timeout:
                    pending.popleft()
                    self.pending_since = 0.0
                    st.dropped += n
                    self.emit(
                        "log",
                        f"multibus bridge {self.name!r}: dropped {n} mirrored messages after "
                        f"{self.send_timeout}s: the {'down' if self.hub else 'up'} socket is "
                        "full (a receiver is not reading)",
                        40,
                    )
                    continue
                return
            pending.popleft()
            self.pending_since = 0.0
            st.frames_out += 1

    def flush_until(self, sock: Any, deadline: float) -> None:
        """(closing) Send what is queued until ``deadline``."""
        while (self.out or self.logs or self.pending) and time.monotonic() < deadline:
            self.flush(sock)
            if self.pending:
                time.sleep(0.002)
