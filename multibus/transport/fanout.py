"""Per-peer flow control of the hub's mirrored frames: one slow peer never blocks another.

The hub's 'down' socket is a ROUTER (peers connect a DEALER whose routing id is their name),
so every mirrored frame is sent to each joined peer on its own pipe. Before, one XPUB with
``XPUB_NODROP`` sent to all at once: a single SUB that did not read (a stuck worker, or a raw
SUB on the '.down' endpoint) made every send fail with EAGAIN, and the sync probes that let new
peers join waited behind it. Now:

* :class:`Fanout` stands where the outbox's data socket was (``Outbox.flush`` hands it each
  frame): each frame goes to every :class:`DownQueue` except its origin's, and never blocks.
* A peer's frames go straight to its pipe (ZeroMQ's HWM: ``DATA_HWM`` frames) while it takes
  them; on EAGAIN they wait in its own queue, in order, and are retried with a short backoff.
  No other peer, no control frame (commands, acks, syncs travel on the control ROUTER or are
  addressed to one peer) ever waits behind that queue.
* A peer whose queue makes no progress for ``slow_timeout`` seconds, or holds more than
  ``QUEUE_BYTES``, is *slow*: its queue is dropped and, until it takes a frame again, every
  frame for it is dropped (an episode: logged once when it starts, once with the count when
  it ends; counted in ``peer_dropped`` and per peer; the peer logs the sequence gap itself).
  ``on_slow(name, reason)`` tells the session (``reason`` '' when the episode ends), which
  publishes ``peer.slow``: the owner's policy may restart the peer instead (the supervisor's
  per-group ``slow_peer``).
* Unknown connections on 'down' get nothing: frames go to joined peers' routing ids only (a
  raw SUB cannot even connect to a ROUTER), so they cannot stall anything.

Everything here runs on the I/O thread.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import zmq

from multibus.transport import wire

__all__ = ["QUEUE_BYTES", "DownQueue", "Fanout"]

QUEUE_BYTES = 32 << 20  # bytes of mirrored frames held for one peer beyond its ZeroMQ pipe
RETRY_FIRST = 0.001  # a blocked peer's queue is retried after this, doubling...
RETRY_MAX = 0.05  # ...up to this (a stuck peer costs the hub 20 tries a second)
NOCOPY = 65536  # frames from this size on are sent without a copy


class DownQueue:
    """One joined peer's mirrored frames that its pipe has not taken yet, and its episode."""

    __slots__ = ("name", "ident", "prefix", "frames", "nbytes", "blocked_since", "retry_at",
                 "backoff", "dropping", "dropped", "episode")

    def __init__(self, name: str, ident: bytes) -> None:
        self.name = name
        self.ident = ident
        self.prefix = wire.origin_prefix("pub", name)  # its own frames: never sent back
        self.frames: collections.deque[tuple[bytes, int]] = collections.deque()
        self.nbytes = 0
        self.blocked_since = 0.0  # the last time its pipe took a frame, while frames wait
        self.retry_at = 0.0
        self.backoff = RETRY_FIRST
        self.dropping = False  # slow: frames for it are dropped until it takes one again
        self.dropped = 0  # messages dropped for it, in total
        self.episode = 0  # ... in the current slow episode

    def info(self) -> dict[str, Any]:
        return {"slow": self.dropping, "dropped": self.dropped, "queued": len(self.frames)}


class Fanout:
    """The hub's mirrored frames, delivered per peer (see the module docstring).

    ``sock`` is the 'down' ROUTER (``ROUTER_MANDATORY``); ``log(text, level)`` logs on the
    hub's bus; ``on_slow(name, reason)`` is called when a slow episode starts and ends.
    """

    def __init__(self, sock: zmq.Socket, stats: Any, slow_timeout: float,
                 log: Callable[[str, int], None],
                 on_slow: Callable[[str, str], None]) -> None:
        self.sock = sock
        self.stats = stats
        self.slow_timeout = slow_timeout
        self.log = log
        self.on_slow = on_slow
        self.queues: dict[str, DownQueue] = {}
        self.blocked: dict[str, DownQueue] = {}  # queues holding frames
        self.next_retry = float("inf")

    # ---------------------------------------------------------------- receivers

    def add(self, name: str, ident: bytes) -> None:
        """``name`` joined: it gets every frame from now on."""
        self.remove(name)
        self.queues[name] = DownQueue(name, ident)

    def remove(self, name: str) -> None:
        """``name`` left (lost, rejoining, forgotten): what waited for it is discarded."""
        q = self.queues.pop(name, None)
        if q is not None:
            self.blocked.pop(name, None)
            if q.dropping:
                self.on_slow(name, "")

    def info(self, name: str) -> dict[str, Any]:
        q = self.queues.get(name)
        return q.info() if q is not None else {"slow": False, "dropped": 0, "queued": 0}

    # ---------------------------------------------------------------- frames

    def deliver(self, frame: bytes, n: int) -> None:
        """(from ``Outbox.flush``) Hand ``frame`` (``n`` messages) to every peer but its
        origin; never blocks: what a peer's pipe does not take waits in its own queue."""
        now = 0.0
        for q in self.queues.values():
            if frame.startswith(q.prefix, 1):
                continue  # relayed from this peer: never echoed
            if q.frames:
                q.frames.append((frame, n))
                q.nbytes += len(frame)
                if q.nbytes > QUEUE_BYTES:
                    self._slow(q, f"not reading: {q.nbytes} bytes of mirrored messages wait")
                continue
            if self._put(q, frame, n):
                continue
            if not now:
                now = time.monotonic()
            if q.dropping:
                self._drop(q, n)
                continue
            q.frames.append((frame, n))
            q.nbytes = len(frame)
            q.blocked_since = now
            q.backoff = RETRY_FIRST
            self._retry_later(q, now)

    def pump(self, now: float) -> float:
        """Retry the blocked queues that are due; declare slow the ones without progress for
        ``slow_timeout``. Returns when to look again (inf: nothing blocked)."""
        if not self.blocked or now < self.next_retry:
            return self.next_retry
        nxt = float("inf")
        for q in list(self.blocked.values()):
            if now >= q.retry_at:
                frames = q.frames
                while frames and self._put(q, *frames[0]):
                    q.nbytes -= len(frames.popleft()[0])
                    q.blocked_since = now
                    q.backoff = RETRY_FIRST
                if not frames:
                    del self.blocked[q.name]
                    continue
                if now - q.blocked_since >= self.slow_timeout:
                    self._slow(q, f"not reading mirrored messages for {self.slow_timeout:g}s")
                    continue
                q.backoff = min(q.backoff * 2, RETRY_MAX)
                q.retry_at = now + q.backoff
            nxt = min(nxt, q.retry_at)
        self.next_retry = nxt
        return nxt

    def _retry_later(self, q: DownQueue, now: float) -> None:
        q.retry_at = now + q.backoff
        self.blocked[q.name] = q
        self.next_retry = min(self.next_retry, q.retry_at)

    def _put(self, q: DownQueue, frame: bytes, n: int) -> bool:
        """One frame onto ``q``'s pipe; False if the pipe is full (or gone: then dropped)."""
        try:
            self.sock.send_multipart((q.ident, frame), zmq.NOBLOCK, copy=len(frame) < NOCOPY)
        except zmq.Again:
            self.stats.retries += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # its 'down' pipe is gone (the peer died or reconnects): the control socket
            # tells the session; until then its frames cannot be delivered
            self._drop(q, n)
            return True
        self.stats.frames_out += 1
        if q.dropping:
            self._recovered(q)
        return True

    def _slow(self, q: DownQueue, why: str) -> None:
        """Start (or go on with) ``q``'s slow episode: drop what waits for it."""
        n = sum(count for _, count in q.frames)
        q.frames.clear()
        q.nbytes = 0
        self.blocked.pop(q.name, None)
        self._drop(q, n)
        if not q.dropping:
            q.dropping = True
            self.stats.slow_peers += 1
            self.log(f"peer {q.name!r} is slow ({why}): dropping mirrored messages for it "
                     "until it reads again", 30)
            self.on_slow(q.name, why)

    def _drop(self, q: DownQueue, n: int) -> None:
        q.dropped += n
        q.episode += n
        self.stats.peer_dropped += n

    def _recovered(self, q: DownQueue) -> None:
        q.dropping = False
        self.log(f"peer {q.name!r} reads again; {q.episode} mirrored messages were dropped "
                 "for it", 30)
        q.episode = 0
        self.on_slow(q.name, "")
