"""Recycling: a worker past its group's ``max_memory`` or ``max_age`` is gracefully replaced.

:class:`Recycler` is one daemon thread (``multibus-recycle``), started only when a group sets
either limit. It looks at the STARTED workers of a running fleet (never while it is stopped,
stopping or exiting):

- memory every :data:`MEMORY_INTERVAL` seconds: the RSS of each worker's process, one
  ``psutil`` read of ``/proc/PID/statm`` per worker (about 15 ms for 1,000 workers), so
  never per event, and nothing at all when no group sets ``max_memory``;
- age at each worker's own deadline: its spawn + ``max_age`` + ``uniform(0,
  max_age_jitter)``, drawn once per process (as Circus's ``max_age``), so a group started
  together is not replaced all at once.

Past a limit it logs why once and asks for a replacement through ``request(worker, pid,
reason)``: in ``multibus run`` the control socket's operation queue (a 'replace' op, shown
in ``status``, run on the main thread one at a time with the user's commands, so it never
races a stop or an exit), otherwise ``bus.defer``.

:func:`replace` is the one replacement operation: the worker is asked to exit (bus 'exit',
its ``stop_timeout``, then SIGTERM and SIGKILL as for any stop), respawned at once when its
process is gone (not a crash: no restart counted against the restart intensity, no backoff),
and waited for until STARTED. Counted per group and reason (``replaced`` in status --json).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from multibus.fleet import WorkerSlot, WorkerState
from multibus.specs import WorkerSpec

__all__ = ["MEMORY_INTERVAL", "REASONS", "Recycler", "replace"]

MEMORY_INTERVAL = 2.0  # seconds between two RSS samples of the fleet
REASONS = ("max_memory", "max_age")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Recycler:
    """Watch ``sup``'s workers (a :class:`~multibus.supervisor.Supervisor`) for their
    group's max_memory and max_age; see the module docstring. ``request(name, pid,
    reason)`` asks for a replacement (default: :func:`replace` through ``bus.defer``).
    ``clock`` and ``jitter`` (``uniform(a, b)``) are for tests."""

    def __init__(self, sup: Any, *, interval: float = MEMORY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        self.sup = sup
        self.interval = interval
        self.clock = clock
        self.jitter = jitter
        self.request: Callable[[str, int, str], Any] = self._defer
        self.replaced: dict[str, dict[str, int]] = {s.name: dict.fromkeys(REASONS, 0)
                                                    for s in sup.specs.values()}
        self.needed = any(s.max_memory or s.max_age for s in sup.specs.values())
        self._deadlines: dict[tuple[str, int], float] = {}  # (worker, pid) -> max_age due
        self._procs: dict[int, psutil.Process] = {}
        self._said: set[tuple[str, int]] = set()  # (worker, pid) whose excess was logged
        self._next_memory = 0.0
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    def _defer(self, name: str, pid: int, reason: str) -> None:
        self.sup.bus.defer(lambda: self.sup.replace(name, pid, reason))

    def start(self) -> None:
        """Start the thread, if a group sets max_memory or max_age."""
        if self.needed and self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="multibus-recycle",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    def _run(self) -> None:
        while not self._closing:
            try:
                due = self.check(self.clock())
            except Exception as e:  # noqa: BLE001 - keep watching; say why once per pass
                self.sup.log(f"recycling check failed: {type(e).__name__}: {e}", 40)
                due = self.clock() + self.interval
            self._wake.wait(max(0.01, min(due - self.clock(), self.interval)))
            self._wake.clear()

    def check(self, now: float) -> float:
        """One pass at time ``now``: ask for each worker past a limit to be replaced; return
        when the next pass is due."""
        keeper = self.sup.keeper
        due = now + self.interval
        sample = now >= self._next_memory
        if sample:
            self._next_memory = now + self.interval
        with keeper.cond:
            running = keeper.running
            slots = [w for w in self.sup.fleet.slots() if w.alive and w.pid is not None]
        live = {w.pid for w in slots}
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        for key in [k for k in self._deadlines if k[1] not in live]:
            del self._deadlines[key]
        self._said &= {(w.name, w.pid) for w in slots}
        if not running:
            return due
        for w in slots:
            spec = w.spec
            if w.state is not WorkerState.STARTED or w.replacing or not (
                    spec.max_memory or spec.max_age):
                continue
            if spec.max_age:
                deadline = self._deadline(w, spec)
                if now >= deadline:
                    self._ask(w, "max_age", f"{now - (w.since or now):.1f}s old, past its "
                              f"max_age {spec.max_age:g}s")
                    continue
                due = min(due, deadline)
            if spec.max_memory and sample:
                rss = self._rss(w.pid)
                if rss is not None and rss > spec.max_memory:
                    self._ask(w, "max_memory", f"RSS {_mb(rss)} is past its max_memory "
                              f"{_mb(spec.max_memory)}")
        return due

    def _deadline(self, w: WorkerSlot, spec: WorkerSpec) -> float:
        key = (w.name, w.pid)
        if key not in self._deadlines:
            extra = self.jitter(0.0, spec.max_age_jitter) if spec.max_age_jitter else 0.0
            self._deadlines[key] = (w.since or self.clock()) + spec.max_age + extra
        return self._deadlines[key]

    def _rss(self, pid: int) -> int | None:
        try:
            proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
            return proc.memory_info().rss
        except psutil.Error:
            self._procs.pop(pid, None)
            return None

    def _ask(self, w: WorkerSlot, reason: str, why: str) -> None:
        """Ask for ``w``'s replacement (again each pass until done: a queued op coalesces);
        say why the first time for this process."""
        assert w.pid is not None
        if (w.name, w.pid) not in self._said:
            self._said.add((w.name, w.pid))
            self.sup.log(f"worker {w.name} (pid {w.pid}): {why}: replacing it gracefully", 30)
        try:
            self.request(w.name, w.pid, reason)
        except Exception as e:  # noqa: BLE001 - e.g. the queue is full: asked again next pass
            self.sup.log(f"cannot queue the replacement of {w.name}: {e}", 30)

    def counted(self, group: str, reason: str) -> None:
        counts = self.replaced.setdefault(group, dict.fromkeys(REASONS, 0))
        counts[reason] = counts.get(reason, 0) + 1


def replace(sup: Any, name: str, pid: int | None = None, reason: str = "max_age") -> str:
    """Replace worker ``name`` (only while process ``pid`` runs it, if given) of ``sup`` (a
    Supervisor) gracefully, for ``reason``; no restart is counted. A worker on shared sockets
    (``sockets = [...]``) is replaced surge-first, as a rolling reload step does
    (:meth:`~multibus.reload.Reloader.replace`: the new one STARTED, then the old one stopped,
    so no capacity is lost); any other (a cmd program, a worker that binds its own port,
    which could not run twice) is asked to exit, escalated as a stop does, respawned at once
    and waited for. Run it where transitions run (the main thread, one at a time). Returns a
    note; nothing is done unless the fleet runs."""
    keeper = sup.keeper
    with keeper.cond:
        w = sup.fleet.current(name, pid)
        if not keeper.running or w is None or w.replacing or w.child is None:
            why = "the fleet is not running" if not keeper.running else (
                "it is being replaced already" if w is not None and w.replacing else
                "no such process any more")
            return f"{name} not replaced: {why}"
        w.replacing = reason
        child = w.child
    sup.recycler.counted(w.wn.group, reason)
    t0 = time.monotonic()
    try:
        if w.spec.sockets and not w.spec.cmd:
            new = sup.reloader.replace([w])[0]
            after = f"{new.pid} ({new.name})"
        else:
            sup.exit_slots([w], peers=True)  # its stop_timeout, then SIGTERM, SIGKILL
            # the keeper respawned it as soon as its process was reaped (Keeper.on_exit)
            keeper.wait_started([w], t0)
            after = str(w.pid)
    finally:
        with keeper.cond:
            w.replacing = None
    note = f"{name} replaced ({reason}): pid {child.pid} -> {after}"
    sup.log(f"worker {note} in {time.monotonic() - t0:.2f}s")
    return note
