"""Repeating work in daemon threads: PerpetualTimer, BackgroundTask, Monitor, ThreadManager.

Same names and constructor arguments as ``cherrypy.process.plugins``. Unlike CherryPy's
BackgroundTask (a ``time.sleep`` loop), every thread here waits on an Event, so ``cancel()``
stops it at once instead of after the current interval, and Monitor.stop() joins the thread
(bounded) so no callback runs after the bus reports STOPPED.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .base import SimplePlugin

JOIN_TIMEOUT = 5.0
"""Seconds Monitor.stop() waits for a running callback to return before giving up (and logging)."""


def _log(bus: Any, msg: str, level: int = 20, traceback: bool = False) -> None:
    if bus is not None:
        bus.log(msg, level=level, traceback=traceback)


def _repeat(task: Any, kind: str) -> None:
    """Call ``task.function`` every ``task.interval`` until ``task.finished`` is set; the first
    failure is logged on ``task.bus`` (or raised without a bus) and ends the loop."""
    while not task.finished.wait(task.interval):
        try:
            task.function(*task.args, **task.kwargs)
        except Exception:
            if task.bus is None:
                raise
            _log(task.bus, f"Error in {kind} thread function {task.function!r}.", 40, True)
            return


class PerpetualTimer(threading.Timer):
    """A threading.Timer that repeats every ``interval`` until ``cancel()``.

    Accepts an extra ``bus`` keyword. The first exception from ``function`` is logged on the bus
    (level 40 with traceback) and stops the timer, to avoid a log flood.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.bus = kwargs.pop("bus", None)
        super().__init__(*args, **kwargs)
        self.daemon = True

    def run(self) -> None:
        _repeat(self, "perpetual timer")


class BackgroundTask(threading.Thread):
    """A daemon thread calling ``function(*args, **kwargs)`` every ``interval`` seconds.

    ``cancel()`` wakes the thread at once (Event, not sleep). The first exception is logged on
    ``bus`` and ends the task.
    """

    def __init__(self, interval: float, function: Callable[..., Any],
                 args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 bus: Any = None) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.function = function
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.bus = bus
        self.finished = threading.Event()

    @property
    def running(self) -> bool:
        """True until cancel() (CherryPy compatibility)."""
        return self.is_alive() and not self.finished.is_set()

    def cancel(self) -> None:
        """Ask the thread to stop; it returns as soon as any running call returns."""
        self.finished.set()

    def run(self) -> None:
        _repeat(self, "background task")


class Monitor(SimplePlugin):
    """Run ``callback`` every ``frequency`` seconds in its own thread while the bus is started."""

    def __init__(self, bus: Any, callback: Callable[[], Any], frequency: float = 60,
                 name: str | None = None) -> None:
        super().__init__(bus)
        self.callback = callback
        self.frequency = frequency
        self.name = name
        self.thread: BackgroundTask | None = None
        self._lock = threading.Lock()

    def _threadname(self) -> str:
        return self.name or self.__class__.__name__

    def start(self) -> None:
        """Start the callback's thread (no-op if frequency <= 0 or already running)."""
        if self.frequency <= 0:
            return
        with self._lock:
            if self.thread is not None:
                _log(self.bus, f"Monitor thread {self._threadname()!r} already started.")
                return
            self.thread = BackgroundTask(self.frequency, self.callback, bus=self.bus)
            self.thread.name = self._threadname()
            self.thread.start()
        _log(self.bus, f"Started monitor thread {self._threadname()!r}.")

    start.priority = 70  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop the thread; wait (bounded by JOIN_TIMEOUT) for a running callback to return."""
        with self._lock:
            thread, self.thread = self.thread, None
        if thread is None:
            _log(self.bus, f"No thread running for {self._threadname()}.")
            return
        thread.cancel()
        if thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                _log(self.bus, f"Monitor thread {thread.name!r} still busy after "
                     f"{JOIN_TIMEOUT}s; leaving it (daemon thread).", 30)
                return
        _log(self.bus, f"Stopped thread {thread.name!r}.")

    def graceful(self) -> None:
        """Restart the callback's thread."""
        self.stop()
        self.start()


class ThreadManager(SimplePlugin):
    """Run 'start_thread'/'stop_thread' listeners for threads that publish
    'acquire_thread'/'release_thread' (same protocol as CherryPy's ThreadManager).

    Each thread gets a unique number (a counter: CherryPy's len()+1 can repeat after releases).
    ``threads`` maps Thread objects (not idents, which the OS reuses once a thread ends without
    releasing) to numbers. On 'stop' and 'graceful' every known thread is released.
    """

    channels = ("acquire_thread", "release_thread", "stop", "graceful")
    announced = ("acquire_thread", "start_thread", "release_thread", "stop_thread")

    def __init__(self, bus: Any) -> None:
        super().__init__(bus)
        self.threads: dict[threading.Thread, int] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        # Like CherryPy: create the channels so plugins subscribed later see them.
        for channel in self.announced:
            if channel not in bus.listeners:
                bus.listeners.setdefault(channel, set())

    def acquire_thread(self) -> None:
        """Publish 'start_thread' with this thread's number, once per thread."""
        thread = threading.current_thread()
        with self._lock:
            if thread in self.threads:
                return
            i = self.threads[thread] = next(self._counter)
        self.bus.publish("start_thread", i)

    def release_thread(self) -> None:
        """Publish 'stop_thread' for this thread if it was acquired."""
        with self._lock:
            i = self.threads.pop(threading.current_thread(), None)
        if i is not None:
            self.bus.publish("stop_thread", i)

    def stop(self) -> None:
        """Release every known thread."""
        with self._lock:
            items, self.threads = list(self.threads.values()), {}
        for i in items:
            self.bus.publish("stop_thread", i)

    graceful = stop
