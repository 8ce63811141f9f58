"""A bridge's counters: one typed object, written by one thread, read from any.

The I/O thread owns :class:`BridgeStats` and increments its fields directly (``st.sent +=
n``). Every other thread (publishers, the dispatch thread, the command applier) *reports* a
count instead: :meth:`BridgeStats.report` appends to a deque (one atomic operation) and the
I/O thread folds the reports in on its next turn. So no ``+=`` ever races with another and no
count is lost; :meth:`snapshot` adds the reports not folded yet, so a reader sees them at once.

:class:`RateLimit` decides which warnings about *peer-caused* bad input (invalid frames, stale
batches, failed handshakes) are logged: a hostile or broken peer must not flood the log.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

__all__ = ["COUNTERS", "BridgeStats", "RateLimit"]

#: Every counter, in the order ``Bridge.stats()`` lists them.
COUNTERS = (
    "sent",  # mirrored messages packed into frames (publisher -> wire)
    "received",  # mirrored messages received from the wire
    "relayed",  # (hub) received messages relayed down to the other peers
    "dispatched",  # received messages published on the local bus
    "ignored",  # received messages on a channel this side does not mirror
    "frames_in",
    "frames_out",
    "invalid",  # frames dropped as invalid (also counted as invalid_<reason>)
    "gaps",  # sequence gaps seen
    "lost",  # messages missing in those gaps
    "stale",  # batches older than the last one seen
    "own_skipped",  # our own publishes relayed back by the hub
    "retries",  # data sends that found the socket full
    "dropped",  # mirrored messages dropped after send_timeout
    "peer_dropped",  # (hub) mirrored messages dropped for slow peers (fanout.py)
    "slow_peers",  # (hub) slow episodes: a peer not reading its mirrored messages
    "refused",  # publishes that could not be packed (raised in the publisher)
    "control_blocked",  # control frames the socket would not take
    "cmd_sent",
    "cmd_retries",
    "cmd_received",
    "cmd_applied",
    "cmd_failed",
    "logs_sent",
    "logs_received",
    "handshake_failed",
    "disconnects",
    "accepted",
    "zap_refused",  # (hub, CURVE) clients refused by the ZAP allow-list
    "name_refused",  # (hub, CURVE) frames from a peer whose key is allowed under another name
    "internal_errors",  # a bug caught in the I/O or dispatch thread (logged with traceback)
    "dispatch_errors",  # a local listener failed on a received message or event
)

FOLD_AT = 4096  # unfolded reports after which a reporter wakes the I/O thread


class BridgeStats:
    """The counters of one bridge (see :data:`COUNTERS`), plus ``invalid_<reason>``.

    Fields are written by the owner thread only; other threads call :meth:`report`.
    ``wake`` (optional) wakes the owner when reports pile up while it sleeps.
    """

    __slots__ = (*COUNTERS, "invalid_by", "_reports", "_lock", "wake")

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.invalid_by: dict[str, int] = {}
        self._reports: collections.deque[tuple[str, int]] = collections.deque()
        self._lock = threading.Lock()
        self.wake = wake

    def report(self, counter: str, n: int = 1) -> None:
        """(any thread but the owner) Add ``n`` to ``counter``, on the owner's next turn."""
        reports = self._reports
        reports.append((counter, n))
        if len(reports) >= FOLD_AT and self.wake is not None:
            self.wake()

    def count_invalid(self, reason: str) -> None:
        """(owner) One invalid frame dropped, for ``reason``."""
        self.invalid += 1
        self.invalid_by[reason] = self.invalid_by.get(reason, 0) + 1

    def fold(self) -> None:
        """(owner) Fold the reports of other threads into the counters."""
        reports = self._reports
        if not reports:
            return
        with self._lock:  # a snapshot never sees a report both folded and pending
            while reports:
                counter, n = reports.popleft()
                setattr(self, counter, getattr(self, counter) + n)

    def snapshot(self) -> dict[str, int]:
        """(any thread) The counters now, reports not folded yet included."""
        with self._lock:
            out = {name: getattr(self, name) for name in COUNTERS}
            pending = list(self._reports)  # one C-level copy: atomic under the GIL
            for reason, n in list(self.invalid_by.items()):
                out["invalid_" + reason] = n
        for counter, n in pending:
            out[counter] += n
        return out


class RateLimit:
    """Which occurrences of a kind of warning to log: the first 3, then each power of two
    from 1024 on. For peer-caused input only; an internal error is logged every time."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, key: str) -> str | None:
        """Count one occurrence of ``key``; return a suffix to log it with, or None."""
        n = self._seen[key] = self._seen.get(key, 0) + 1
        if n <= 3:
            return ""
        if n >= 1024 and n & (n - 1) == 0:
            return f" ({n} so far)"
        return None
