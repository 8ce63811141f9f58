"""Job workers for ``examples/fleet.toml``: each finishes its current job before it stops.

Target ``jobs:worker`` (called with the worker's bus) subscribes a :class:`JobRunner`:

- 'start' starts a thread that does one job after another (a job is simulated work of
  ``JOB_SECONDS`` seconds, default 0.5) and logs each one;
- 'graceful' asks it to reload between two jobs: the current job finishes, the settings are
  read again (``JOB_SECONDS``), then work goes on;
- 'stop' lets the current job finish, then the thread ends (no job is cut in half); it waits
  at most one job's length, well inside the group's ``stop_timeout``.

Run it:  ``python -m multibus run examples/fleet.toml``, then from another terminal
``python -m multibus status`` / ``graceful`` / ``scale job 5`` / ``stop`` / ``start`` / ``exit``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class JobRunner:
    """Do jobs while the bus is STARTED; never abandon a job half-done."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.done = 0
        self.seconds = self._settings()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()

    @staticmethod
    def _settings() -> float:
        return float(os.environ.get("JOB_SECONDS", "0.5"))

    def subscribe(self) -> JobRunner:
        for channel in ("start", "stop", "graceful"):
            self.bus.subscribe(channel, getattr(self, channel))
        return self

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="jobs")
        self._thread.start()

    def graceful(self) -> None:
        self._reload.set()  # picked up between two jobs

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            return  # not running (exit() stops an already stopped bus again)
        self._thread.join()  # the current job finishes first
        self._thread = None
        self.bus.log(f"stopped after {self.done} jobs")

    def _work(self) -> None:
        while not self._stop.is_set():
            self.done += 1
            time.sleep(self.seconds)  # the "job": simulated work that must not be interrupted
            self.bus.log(f"job {self.done} done")
            if self._reload.is_set():
                self._reload.clear()
                self.seconds = self._settings()
                self.bus.log(f"reloaded after job {self.done} (job length {self.seconds:g}s)")


def worker(bus: Any) -> None:
    """Worker target: ``jobs:worker``."""
    JobRunner(bus).subscribe()
