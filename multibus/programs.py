"""Programs: the lifecycle of a ``cmd`` group's workers, which have no bus.

A bus worker reports its own state; a program's state is the supervisor's to drive, through
signals and its ready check:

- spawned (:mod:`multibus.spawner`, through :mod:`multibus.launcher`): SPAWNING, then STARTED
  once its ``ready`` check passes (:mod:`multibus.readiness`, run on the process-manager
  thread, never blocking it), at once without one. A check that does not pass within
  ``start_timeout`` is the worker's start error (a starting fleet fails naming the check),
  and the process is stopped, then restarted as its ``restart`` mode says;
- stop (``multibus stop``, the fleet's exit, a scale down): its ``stop_signal`` goes to the
  process, which is STOPPING until it exits; still alive after ``stop_timeout``, its process
  group gets SIGKILL (:func:`~multibus.child.stop_children`). There is no "stopped but
  running" for a program: ``stop`` ends it and ``start`` spawns it again;
- graceful (``multibus graceful``, SIGHUP when detached): its ``graceful_signal`` goes to the
  process; its state stays STARTED.

Signals go to the program's own process (as supervisord and Circus do by default: a shell
script's children are not HUPed behind its back); when it exits, whatever is left of its
process group gets SIGTERM, as for a bus worker (:meth:`~multibus.procs.ProcessManager`).
Its output is read and logged as a worker's; exits feed the same restart policy.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any

from multibus.child import Child
from multibus.fleet import WorkerSlot, WorkerState
from multibus.readiness import parse, wait_ready

__all__ = ["Programs", "is_program"]

S = WorkerState


def is_program(w: WorkerSlot) -> bool:
    """``w`` runs a ``cmd`` program (no bus)."""
    return bool(w.spec.cmd)


def _send(child: Child, sig: int) -> bool:
    """``sig`` to the program's process, then SIGCONT so a suspended one acts on it."""
    try:
        os.kill(child.pid, sig)
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
            os.kill(child.pid, signal.SIGCONT)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Programs:
    """The programs of a :class:`~multibus.keeper.Keeper`'s fleet: it calls :meth:`spawned`
    and :meth:`exited` from the process-manager thread; the supervisor calls :meth:`stop` and
    :meth:`graceful` from the bus's thread."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def split(self, slots: Iterable[WorkerSlot]) -> tuple[list[WorkerSlot], list[WorkerSlot]]:
        """(bus workers, programs) of ``slots``."""
        slots = list(slots)
        return ([w for w in slots if not is_program(w)], [w for w in slots if is_program(w)])

    def spawned(self, w: WorkerSlot, child: Child) -> None:
        """Program ``w`` got process ``child`` (manager thread, ``cond`` not held): STARTED
        now, or once its ready check passes."""
        k = self.keeper
        if w.spec.ready is None:
            self._started(w, child, "")
            return

        def done(ok: bool, why: str) -> None:
            child.data.pop("ready_wait", None)
            if ok:
                self._started(w, child, why)
            else:
                self._not_ready(w, child, why)

        child.data["ready_wait"] = wait_ready(parse(w.spec.ready), k.procs.call_later, done,
                                              w.spec.start_timeout)

    def _started(self, w: WorkerSlot, child: Child, why: str) -> None:
        k = self.keeper
        with k.cond:
            if w.child is not child or child.returncode is not None:
                return
            if w.state in (S.SPAWNING, S.JOINED):
                w.state = S.STARTED
        if why:
            k.log(f"worker {w.name} (pid {child.pid}) STARTED: {why}", 20)
        k.changed(w)

    def _not_ready(self, w: WorkerSlot, child: Child, why: str) -> None:
        k = self.keeper
        with k.cond:
            if w.child is not child or child.returncode is not None:
                return
            w.start_error = why
            w.last_lines = [*child.last_lines[-2:], why]
            self._stop_one(w, child)
        k.log(f"worker {w.name} (pid {child.pid}): {why}; stopping it", 30)
        k.procs.call_later(w.spec.stop_timeout,
                           lambda: child.returncode is None and child.kill())
        k.changed(w)

    def exited(self, child: Child) -> None:
        """Its process is gone: no more ready attempts (manager thread)."""
        wait = child.data.pop("ready_wait", None)
        if wait is not None:
            wait.cancel()

    def _stop_one(self, w: WorkerSlot, child: Child) -> None:
        child.data["kill_at_deadline"] = True  # stop_children: SIGKILL at the deadline
        if _send(child, signal.Signals[w.spec.stop_signal]):
            w.state = S.STOPPING

    def stop(self, slots: Iterable[WorkerSlot]) -> list[Child]:
        """Send each live program of ``slots`` its stop signal; return their processes (for
        :func:`~multibus.child.stop_children`, which kills them at their deadline)."""
        k = self.keeper
        out = []
        with k.cond:
            for w in slots:
                child = w.child
                if is_program(w) and child is not None and child.returncode is None:
                    self._stop_one(w, child)
                    out.append(child)
        if out:
            k.changed()
        return out

    def graceful(self, slots: Iterable[WorkerSlot]) -> None:
        """Send each live program of ``slots`` its graceful signal (a reload)."""
        for w in slots:
            child = w.child
            if is_program(w) and child is not None and child.returncode is None:
                _send(child, signal.Signals[w.spec.graceful_signal])

    @staticmethod
    def why_late(w: WorkerSlot, waited: float) -> str | None:
        """What keeps program ``w`` from STARTED after ``waited`` s (None: not a program
        still waiting for its check)."""
        if not is_program(w) or w.state is not S.SPAWNING or not w.alive:
            return None
        return (f"{w.name}: its ready check {w.spec.ready} has not passed after "
                f"{waited:.1f}s (start_timeout {w.spec.start_timeout:g}s)")
