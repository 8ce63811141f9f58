"""LogRing: the last N records of a bus's 'log' channel, numbered, for ``multibus logs``.

A 'log' listener (it runs on whichever thread logs: the bridge's I/O thread, the process
thread, the main thread), so appending takes one short lock and never blocks on anything
else. Each record gets a sequence number: a client asks for the records after the last one
it saw, which is how ``multibus logs -f`` follows without losing or repeating lines.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from multibus.logview import Record, split_source

__all__ = ["MAX_LOG_TEXT", "LogRing"]

MAX_LOG_TEXT = 8192  # characters kept of one log record


class LogRing:
    """Keep the last ``size`` records; ``on_record()`` (optional) is called after each one
    is kept (e.g. to wake a thread that serves followers)."""

    def __init__(self, size: int = 5000, on_record: Callable[[], Any] | None = None) -> None:
        self._records: collections.deque[Record] = collections.deque(maxlen=size)
        self._next = 1  # the next record's seq
        self._lock = threading.Lock()
        self._sources: set[str] = set()
        self.on_record = on_record

    def __call__(self, msg: Any = "", level: Any = 20, *args: Any, **kw: Any) -> None:
        """The 'log' listener: ``(msg, level)`` as the bus publishes them."""
        text = msg if isinstance(msg, str) else str(msg)
        if len(text) > MAX_LOG_TEXT:
            text = text[:MAX_LOG_TEXT] + " [truncated]"
        lvl = level if isinstance(level, int) and not isinstance(level, bool) else 20
        source, text = split_source(text)
        with self._lock:
            self._records.append((self._next, time.time(), lvl, source, text))
            self._next += 1
            self._sources.add(source)
        if self.on_record is not None:
            self.on_record()

    def log_lines(self, source: str, texts: Sequence[str], level: int = 20) -> None:
        """The records ``source | text`` for each of ``texts`` (see ``Bus.log_lines``): one
        record each, as through the listener, kept in one step."""
        if not texts:
            return
        if max(map(len, texts)) > MAX_LOG_TEXT:
            texts = [t if len(t) <= MAX_LOG_TEXT else t[:MAX_LOG_TEXT] + " [truncated]"
                     for t in texts]
        n, t, rep = len(texts), time.time(), itertools.repeat
        with self._lock:
            first, self._next = self._next, self._next + n
            self._records.extend(zip(range(first, first + n), rep(t), rep(level), rep(source),
                                     texts, strict=False))
            self._sources.add(source)
        if self.on_record is not None:
            self.on_record()

    def sources(self) -> frozenset[str]:
        """Every source that logged a record (kept or since dropped from the ring)."""
        with self._lock:
            return frozenset(self._sources)

    def records(self, since: int = 0, limit: int = 1000,
                keep: Callable[[str], bool] | None = None,
                where: Callable[[str, str], bool] | None = None) -> tuple[list[Record], int]:
        """Records with seq > ``since`` whose source passes ``keep`` (and whose source and
        text pass ``where``: a host's records are told apart by their text), at most
        ``limit`` (the latest when ``since`` is 0); and the seq to ask from next time."""
        with self._lock:
            recs = list(self._records)
        last = max(recs[-1][0] if recs else 0, since)
        picked = [r for r in recs if r[0] > since and (keep is None or keep(r[3]))
                  and (where is None or where(r[3], r[4]))]
        if since == 0:
            return picked[-limit:], last
        if len(picked) > limit:
            return picked[:limit], picked[limit - 1][0]
        return picked, last
