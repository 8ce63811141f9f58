"""Dispatch to the local bus: what the wire brought in, published from a thread of its own.

The I/O thread never calls a listener (a slow one would stall every socket): it queues
received publishes, peers' logs and the bridge's own events (``peer.*``, ``hub.*``, 'log')
here, in order, and :class:`Dispatcher` publishes them on its daemon thread, started at the
first item. A peer given ``apply_via`` publishes its events through that instead, so they
stay in order with the lifecycle commands it applies there.

While ``DISPATCH_BACKLOG`` items wait, the I/O thread stops reading mirrored frames (so a slow
listener pushes back on the sender, not on memory); the dispatch thread wakes it when half
the backlog is done. A listener's failure was logged by the bus: it is counted as a dispatch
error. SystemExit from a listener is not an error of ours (a dispatch thread cannot exit the
process): it is neither counted nor allowed to end the thread. Any other exception is a bug
here and is logged with its traceback, every time.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

from multibus.logview import escape_controls
from multibus.transport.stats import BridgeStats

__all__ = ["DISPATCH_BACKLOG", "Dispatcher"]

DISPATCH_BACKLOG = 64  # frames waiting for the dispatch thread before we stop reading


class Dispatcher:
    """Publishes on ``bus`` what the I/O thread hands it (:meth:`put`, :meth:`emit`).

    ``put_count`` is written by the I/O thread only and ``done`` by the dispatch thread only,
    so ``backlog`` needs no lock. ``input_paused`` is set by the I/O thread while it does not
    read for us; ``wake_io`` wakes it.
    """

    def __init__(
        self,
        bus: Any,
        name: str,
        channels: frozenset[str],
        tls: Any,
        stats: BridgeStats,
        wake_io: Callable[[], None],
        apply_via: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.bus = bus
        self.name = name
        self.channels = channels
        self.tls = tls  # .remote: the channel this thread dispatches (the mirror skips it)
        self.stats = stats
        self.wake_io = wake_io
        self.apply_via = apply_via
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.put_count = 0  # I/O thread only
        self.done = 0  # dispatch thread only
        self.input_paused = False  # I/O thread only

    @property
    def backlog(self) -> int:
        return self.put_count - self.done

    # ---------------------------------------------------------------- I/O thread

    def emit(self, channel: str, *args: Any) -> None:
        """Publish an event on the local bus, in order with what came before it."""
        if self.apply_via is not None:
            self.apply_via(functools.partial(self.publish_event, channel, args))
        else:
            self.put(("event", channel, args))

    def put(self, item: tuple[Any, ...]) -> None:
        """Queue ``item`` (('pub', runs), ('logs', origin, msgs) or ('event', channel, args))."""
        self.put_count += 1
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._main, name=f"bridge-dispatch-{self.name}", daemon=True
            )
            self.thread.start()
        self.inbox.put(item)

    # ---------------------------------------------------------------- any thread

    def stop(self) -> None:
        """End the dispatch thread after what is queued (bounded wait)."""
        self.inbox.put(None)
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(2)

    # ---------------------------------------------------------------- dispatch thread

    def publish_event(self, channel: str, args: tuple[Any, ...]) -> None:
        try:
            if channel == "log":
                self.bus.log(*args)
            else:
                self.bus.publish(channel, *args)
        except Exception:  # noqa: BLE001 - logged by the bus; counted
            self.stats.report("dispatch_errors")

    def _main(self) -> None:
        inbox = self.inbox
        report = self.stats.report
        while True:
            item = inbox.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "pub":
                    self.deliver(item[1], item[2])
                elif kind == "event":
                    self.publish_event(item[1], item[2])
                elif kind == "logs":
                    self._logs(item[1], item[2])
            except (SystemExit, KeyboardInterrupt):
                pass  # a listener's, not ours: this thread cannot exit the process
            except Exception:  # noqa: BLE001 - counted and logged
                report("internal_errors")
                self._log_internal()
            finally:
                self.done += 1
                if self.input_paused and self.put_count - self.done == DISPATCH_BACKLOG // 2:
                    self.wake_io()  # input paused for us: the I/O thread may read again

    def _log_internal(self) -> None:
        try:
            self.bus.log(f"multibus bridge {self.name!r}: dispatch thread error", 40,
                         traceback=True)
        except Exception:  # noqa: BLE001 - a failing 'log' listener: counted
            self.stats.report("dispatch_errors")

    def _logs(self, origin: str, msgs: list[Any]) -> None:
        """A peer's 'log' records: ``peer.log(name, msg, level)`` (as sent) and ``log(name |
        msg)`` with ``msg`` on one line, its control characters escaped (a peer cannot fake
        other lines or sources on the hub's output); the latter a run of one level at a time
        (``Bus.log_lines``, where the bus has it)."""
        bus = self.bus
        log_lines = getattr(bus, "log_lines", None)
        run: list[str] = []
        for i, (msg, level) in enumerate(msgs):
            self._call(bus.publish, "peer.log", origin, msg, level)
            if log_lines is None:
                self._call(bus.log, f"{origin} | {escape_controls(msg)}", level)
                continue
            run.append(escape_controls(msg))
            if i + 1 == len(msgs) or msgs[i + 1][1] != level:
                self._call(log_lines, origin, run, level)
                run = []

    def _call(self, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception:  # noqa: BLE001 - logged by the bus; counted
            self.stats.report("dispatch_errors")

    def deliver(self, runs: list[list[Any]], origin: str) -> None:
        """Publish received messages (of process ``origin``) on the local bus. ``tls.remote``
        tells our own mirror listener not to send them back (a listener publishing on the
        *same* channel from in here is therefore not mirrored either; other channels are);
        ``tls.origin`` tells a listener who published (:meth:`Bridge.origin`)."""
        publish = self.bus.publish
        tls = self.tls
        mirrored = self.channels
        ignored = failed = total = 0
        tls.origin = origin
        try:
            for ch, haskw, entries in runs:
                total += len(entries)
                if ch not in mirrored:
                    ignored += len(entries)
                    continue
                tls.remote = ch
                if haskw:
                    for args, kw in entries:
                        try:
                            publish(ch, *args, **kw)
                        except Exception:  # noqa: BLE001 - logged by the bus; counted
                            failed += 1
                else:
                    for args in entries:
                        try:
                            publish(ch, *args)
                        except Exception:  # noqa: BLE001 - logged by the bus; counted
                            failed += 1
        finally:
            tls.remote = tls.origin = None
            report = self.stats.report
            report("dispatched", total - ignored)
            if ignored:
                report("ignored", ignored)
            if failed:
                report("dispatch_errors", failed)
