"""Restart policy: when to restart a dead worker, and when to give up (OTP's intensity).

Pure bookkeeping, no processes and no threads: the supervisor asks :meth:`RestartPolicy.decide`
each time a worker it wants restarted has died, and gets either a delay or :class:`GiveUp`.

- **intensity**: more than ``max_restarts`` restarts within ``period`` seconds, counted per
  group (each group may have its own :class:`Intensity`), means the fault will not go away by
  restarting: give up (that group goes FATAL, or the fleet stops) instead of crash-looping;
- **backoff**, per worker: a worker that ran at least ``period`` seconds starts afresh; the
  first quick failure restarts at once, the next ones after ``first``, ``2*first``, ...
  capped at ``cap`` seconds.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from multibus.specs import Intensity

__all__ = ["GiveUp", "RestartPolicy"]


@dataclass(frozen=True)
class GiveUp:
    """Restart intensity reached: ``restarts`` (this one included) within ``period`` s."""

    restarts: int
    period: float
    max_restarts: int

    def __str__(self) -> str:
        return (f"restart intensity reached: {self.restarts} restarts within {self.period:g}s "
                f"(max {self.max_restarts})")


class RestartPolicy:
    """Backoff per worker and intensity per group (``intensity`` is the default one); time
    comes from ``clock``."""

    def __init__(
        self,
        intensity: Intensity | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.intensity = intensity or Intensity()
        self.first, self.cap = backoff
        self._clock = clock
        # group -> times of its restarts within its period
        self._times: dict[Hashable, collections.deque[float]] = {}
        self._quick: dict[Hashable, int] = {}  # worker -> failures in a row, each too quick

    def reset(self, group: Hashable | None = None) -> None:
        """Forget the restarts counted so far: of ``group`` (it is started again), or of
        every group (None: a new start of the fleet)."""
        if group is None:
            self._times.clear()
        else:
            self._times.pop(group, None)

    def forget(self, worker: Hashable) -> None:
        """``worker`` is gone for good: a new worker of that name starts afresh."""
        self._quick.pop(worker, None)

    def decide(self, worker: Hashable, uptime: float, group: Hashable = None,
               intensity: Intensity | None = None) -> float | GiveUp:
        """``worker`` of ``group`` died after ``uptime`` s: the delay before restarting it, or
        GiveUp. A restart it returns a delay for is counted against that group's
        ``intensity`` (default: the policy's)."""
        now = self._clock()
        limit = intensity or self.intensity
        period, most = limit.period, limit.max_restarts
        times = self._times.setdefault(group, collections.deque())
        while times and now - times[0] > period:
            times.popleft()
        if len(times) >= most:
            return GiveUp(len(times) + 1, period, most)
        times.append(now)
        quick = 0 if uptime >= period else self._quick.get(worker, 0) + 1
        self._quick[worker] = quick
        return 0.0 if quick <= 1 else min(self.cap, self.first * 2 ** (quick - 2))
