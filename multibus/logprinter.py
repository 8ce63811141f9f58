"""LogPrinter: the 'log' listener that prints a fleet's records on a terminal, never blocking.

Used by ``run_fleet`` (every record of the supervisor's bus, on stderr) and by ``multibus
logs`` (records fetched from a running supervisor, on stdout). Lines are formatted by
:mod:`multibus.logview`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from multibus.logview import (
    SUPERVISOR,
    Record,
    format_json_lines,
    format_lines,
    split_source,
    use_colour,
)

__all__ = ["LogPrinter", "Lines", "MAX_WIDTH", "fleet_sources"]

MAX_WIDTH = 24  # the source column never grows past this
HANDOFF = 0.05  # s a full queue waits for a writer that is not stuck before it drops
# A record per text: (time, level, source, texts), as Bus.log_lines hands them over.
Lines = tuple[float, int, str, Sequence[str]]


def fleet_sources(counts: Mapping[str, int]) -> list[str]:
    """The widest sources a fleet's lines can show: 'supervisor' and, per group (name ->
    worker count), a worker with an index of two digits at least, so that the column keeps
    its width while a group scales up to 100."""
    return [SUPERVISOR, *(f"{group}.{max(n, 100) - 1}" for group, n in counts.items())]


class LogPrinter:
    """The 'log' listener of ``multibus run``: filter by level, format, write.

    Listeners run on the bridge's I/O thread and the process thread too, so the listener never
    blocks on the terminal: records go to a bounded queue that one daemon thread writes out. A
    stalled stderr (a paused pager, a slow journal) drops lines — counted and reported —
    instead of stalling heartbeats or reaping. ``close()`` flushes what is queued.

    A worker's output lines come a chunk at a time (:meth:`log_lines`, called by
    ``Bus.log_lines``): one queue entry per chunk, formatted with one prefix; ``max_queue``
    and ``dropped`` count lines either way. A full queue gives the writer up to ``HANDOFF``
    to take it before dropping, unless the writer has been busy with one batch that long
    (a stalled stream): a thread that floods the printer (worker output at 400k lines/s)
    can otherwise keep the GIL from a writer that is merely waiting for it.
    """

    def __init__(self, level: int, fmt: str, stream: TextIO, max_queue: int = 10000,
                 sources: Iterable[str] = ()) -> None:
        """``sources``: the source names expected (e.g. :func:`fleet_sources`): the source
        column is as wide as the widest from the first line on, instead of widening partway
        (it still widens for a longer one, up to ``MAX_WIDTH``)."""
        self.level = level
        self.fmt = fmt
        self.stream = stream
        self.colour = fmt == "text" and use_colour(stream)
        self.width = min(max((len(s) for s in sources), default=0), MAX_WIDTH)
        self.dropped = 0
        self._queue: collections.deque[Any] = collections.deque()
        self._queued = 0  # lines in _queue
        self._busy_since: float | None = None  # when the writer took the batch it writes
        self._max = max_queue
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> LogPrinter:
        self._thread = threading.Thread(target=self._run, name="multibus-log", daemon=True)
        self._thread.start()
        return self

    def __call__(self, msg: Any = "", level: Any = 20, *args: Any, **kw: Any) -> None:
        lvl = level if isinstance(level, int) and not isinstance(level, bool) else 20
        if lvl < self.level:
            return
        source, text = split_source(msg if isinstance(msg, str) else str(msg))
        self.put(self.item((time.time(), lvl, source, (text,))))

    def log_lines(self, source: str, texts: Sequence[str], level: int = 20) -> None:
        """The 'log' records ``source | text`` for each of ``texts``, in one call (see
        ``Bus.log_lines``)."""
        if level >= self.level and texts:
            self.put(self.item((time.time(), level, source, texts)), weight=len(texts))

    def item(self, lines: Lines) -> Any:
        """What is queued for ``lines``: the lines themselves (a subclass may add to it)."""
        return lines

    def put(self, item: Any, always: bool = False, weight: int = 1) -> None:
        """Queue ``item`` (``weight`` lines) for the writer thread (``always``: even past
        ``max_queue``), or write it now without one; a full queue drops it, counted."""
        if self._thread is None:
            self.emit(item)
            return
        with self._cond:
            if self._queued >= self._max and not always and not self._handed_off():
                self.dropped += weight
                return
            self._queue.append(item)
            self._queued += weight
            if len(self._queue) == 1:  # the writer waits only on an empty queue
                self._cond.notify()

    def _handed_off(self) -> bool:
        """The queue is full (``_cond`` held): wait for the writer to take it, unless it has
        been writing one batch for ``HANDOFF`` s already; True once there is room."""
        now = time.monotonic()
        since = self._busy_since
        end = (now if since is None else since) + HANDOFF
        while self._queued >= self._max and now < end and not self._closed:
            self._cond.wait(end - now)
            now = time.monotonic()
            if self._busy_since != since:  # it took a batch: writing again, from now
                since = self._busy_since
                end = min(end, now + HANDOFF) if since is None else since + HANDOFF
        return self._queued < self._max

    def _run(self) -> None:
        reported = 0
        while True:
            with self._cond:
                self._busy_since = None
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._queued = 0
                self._busy_since = time.monotonic()
                self._cond.notify_all()  # a put() waiting for room
                dropped = self.dropped
            if dropped > reported:
                self.notice(f"{dropped - reported} log lines dropped (output too slow)")
                reported = dropped
            for item in batch:
                self.emit(item, flush=False)
            self._flush()  # once per batch: a flush per line was the writer's main cost

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued (bounded by ``timeout``), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def emit(self, item: Any, flush: bool = True) -> None:
        """Write one queued item (:meth:`item` made it) out."""
        self.write(item, flush)

    def notice(self, text: str) -> None:
        """Write the printer's own warning (lines dropped) out."""
        self.write((time.time(), 30, SUPERVISOR, (text,)))

    def write(self, rec: Record | Lines, flush: bool = True) -> None:
        """Write a record (``(seq, time, level, source, text)``) or lines out."""
        t, level, source, texts = rec if len(rec) == 4 else (*rec[1:4], (rec[4],))
        if self.fmt == "json":
            line = format_json_lines(t, level, source, texts)
        else:
            self.width = max(self.width, min(len(source), MAX_WIDTH))
            line = format_lines(t, level, source, texts, self.colour, self.width)
        try:
            self.stream.write(line + "\n")
        except (OSError, ValueError):
            pass  # closed terminal: keep running
        if flush:
            self._flush()

    def _flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass
