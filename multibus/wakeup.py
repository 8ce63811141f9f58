"""One wake-up primitive and one call queue, shared by every loop in multibus.

Each of multibus's threads sleeps in ``poll()``/``select()`` on its own descriptors. Work
handed to it from another thread, or from a signal handler, must end that sleep at once:
:class:`Wakeup` is the one descriptor that does it (the model is Trio's wake-up socketpair).
:class:`CallQueue` is the one way to hand a loop a callable, now or after a delay; it returns
a :class:`Handle` that cancels the call (the model is Trio's entry queue and asyncio's
``call_later``). Neither knows anything of zmq, buses or processes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CallQueue", "Handle", "Wakeup"]


class Wakeup:
    """A non-blocking pipe: :meth:`wake` from any thread or signal handler ends a poll on
    :meth:`fileno`; the owner calls :meth:`drain` after it woke.

    Writing to a full pipe is a no-op (a wake-up is pending anyway), so ``wake()`` never
    blocks and is safe in a signal handler. Both ends are close-on-exec. The write end can
    also be given to ``signal.set_wakeup_fd``.
    """

    __slots__ = ("_r", "_w", "_pending")

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending = False  # a byte is in the pipe since the last drain()

    def fileno(self) -> int:
        """The read end: register it for reading in the owner's poller."""
        return self._r

    @property
    def write_fd(self) -> int:
        """The write end, for ``signal.set_wakeup_fd``."""
        return self._w

    def wake(self) -> None:
        # One byte per drain() is enough: the owner drains before it looks at its work, so
        # work handed over before this call is seen either way.
        if self._pending:
            return
        self._pending = True
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending) or closed
            pass

    def drain(self) -> bytes:
        """Empty the pipe; return what was written (signal numbers, for a wakeup fd).
        Call it before looking at the work the wake-up announced."""
        data = b""
        try:
            while chunk := os.read(self._r, 4096):
                data += chunk
        except (BlockingIOError, OSError):
            pass
        # Only now: a wake() between the read and this line finds the flag still set and
        # skips its write, but its work was queued before, so the owner sees it anyway.
        self._pending = False
        return data

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


class Handle:
    """A scheduled call: :meth:`cancel` keeps it from running if it has not run yet."""

    __slots__ = ("when", "func", "cancelled")

    def __init__(self, when: float, func: Callable[[], Any]) -> None:
        self.when = when
        self.func = func
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Handle {self.func!r} at {self.when:.3f}{state}>"


class CallQueue:
    """Callables to run in one owner thread, in due-time order (then in order of arrival).

    :meth:`call_soon` and :meth:`call_later` are safe from any thread and from a signal
    handler; each calls ``wake()`` so the owner's sleep ends. The owner sleeps at most
    :meth:`timeout` and then calls :meth:`run_due`. A failing call is passed to ``on_error``
    (the call and the exception) and the rest still run; ``KeyboardInterrupt`` and
    ``SystemExit`` propagate.
    """

    def __init__(
        self,
        wake: Callable[[], None] | None = None,
        on_error: Callable[[Callable[[], Any], BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wake = wake
        self._on_error = on_error
        self._clock = clock
        self._ready: collections.deque[Handle] = collections.deque()  # call_soon: no clock
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        # Reentrant: a signal handler may schedule a call while the owner holds the lock.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._ready) + len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._ready or self._heap)

    def call_soon(self, func: Callable[[], Any], first: bool = False) -> Handle:
        """Run ``func`` on the owner's next turn, after the calls already waiting; ``first``:
        before them (urgent work, e.g. a signal, must not wait behind a backlog)."""
        handle = Handle(0.0, func)
        # deque.append/appendleft are atomic: no lock on the hot path
        (self._ready.appendleft if first else self._ready.append)(handle)
        if self._wake is not None:
            self._wake()
        return handle

    def call_later(self, delay: float, func: Callable[[], Any]) -> Handle:
        return self.call_at(self._clock() + delay, func)

    def call_at(self, when: float, func: Callable[[], Any]) -> Handle:
        handle = Handle(when, func)
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
        if self._wake is not None:
            self._wake()
        return handle

    def timeout(self) -> float | None:
        """Seconds until the next call is due (0: now), or None when nothing is queued."""
        if self._ready:
            return 0.0
        with self._lock:
            if not self._heap:
                return None
            return max(0.0, self._heap[0][0] - self._clock())

    def run_due(self) -> int:
        """Run every call due now (calls queued meanwhile for now run too); return how many."""
        ran = 0
        now = self._clock() if self._heap else 0.0
        while True:
            if self._ready:
                handle = self._ready.popleft()
            else:
                with self._lock:
                    if not self._heap or self._heap[0][0] > now:
                        return ran
                    handle = heapq.heappop(self._heap)[2]
            if handle.cancelled:
                continue
            ran += 1
            try:
                handle.func()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                if self._on_error is None:
                    raise
                self._on_error(handle.func, exc)
