"""Rolling reload: replace a group's workers with processes on new code, one surge at a time.

``multibus reload [GROUP...]`` (and SIGUSR2) runs :meth:`Reloader.reload` as a queued
operation on the supervisor's main thread. New code means new processes that never fork
the old code: a fresh zygote generation (it imports the preloads again), or fresh
interpreters when workers are exec'd. Then, for each group, :meth:`Reloader.replace` takes
its workers ``max_surge`` at a time:

1. surge: start that many replacements (new slots at the lowest free indices, of the group's
   new code generation) while the old workers keep serving;
2. wait until each replacement is STARTED: its bus STARTED (a server subscribed to 'start'
   is serving by then); a cmd program is STARTED only once its ``ready`` check passes
   (:mod:`multibus.programs`), so the check is part of the wait;
3. retire the old ones: an 'exit' command, so their bus stops gracefully and in-flight
   requests finish (then the usual stop_timeout / SIGTERM / SIGKILL escalation).

A replacement is on trial until it is STARTED (restart 'temporary': a crash is not
restarted, it fails the reload at once). A replacement that fails aborts the reload: the
failed replacements are stopped, the old workers keep serving, the zygote of the old code is
put back, and :class:`ReloadError` carries the replacement's own error (the command prints it
and exits 1). An 'exit' queued meanwhile interrupts the reload the same way (:meth:`interrupt`).
Shared listening sockets (:mod:`multibus.sockets`) stay bound throughout, so no connection is
refused. ``replace`` is the reusable step: recycling a worker on shared sockets (max
memory/age, :mod:`multibus.recycle`) is a replace.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import replace as with_fields
from typing import Any

from multibus.child import signal_group
from multibus.fleet import Group, WorkerSlot, WorkerState

__all__ = ["ReloadError", "Reloader"]

S = WorkerState
DRAIN_WAIT = 1.0  # s to let a dead replacement's last output lines arrive for its error


class ReloadError(RuntimeError):
    """A reload failed or was interrupted; the message says which worker and why."""


class Reloader:
    """Rolling reloads of supervisor ``sup``'s groups (see the module docstring)."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self._interrupted: str | None = None
        self._retiring: list[threading.Thread] = []  # old workers being stopped meanwhile
        # their names: not given to a replacement until the hub has forgotten them
        self._leaving: set[str] = set()

    @property
    def keeper(self) -> Any:
        return self.sup.keeper

    def generation(self, name: str) -> dict[str, int]:
        """Once group ``name`` has been reloaded: its code ``generation`` and how many of its
        running workers are on it (``new``) or on an older one (``old``: a reload is under
        way, or failed); nothing before its first reload."""
        with self.keeper.cond:
            g = self.sup.fleet.groups.get(name)
            if g is None or not g.generation:
                return {}
            gens = [w.generation for w in g.slots.values() if w.alive]
            new = sum(1 for x in gens if x >= g.generation)
            return {"generation": g.generation, "new": new, "old": len(gens) - new}

    def interrupt(self, why: str) -> None:
        """Stop a reload under way at its next step (any thread): 'exit' was asked for."""
        with self.keeper.cond:
            self._interrupted = why
            self.keeper.cond.notify_all()

    def interrupt_soon(self, why: str) -> None:
        """:meth:`interrupt` from a signal handler (a stop signal): no lock taken here; the
        process thread wakes the reload's waits. Harmless when no reload runs (each reload
        starts uninterrupted)."""
        self._interrupted = why
        spawner = self.keeper.spawner
        if spawner is not None:
            spawner.procs.call_soon(self.keeper.changed)

    # -- the whole reload --------------------------------------------------------------------

    def reload(self, groups: Iterable[str] = ()) -> str:
        """Replace every worker of ``groups`` (none named: every group) with one on new code;
        return what was done. ReloadError (old workers still serving) when it fails."""
        names = list(groups) or list(self.sup.fleet.groups)
        unknown = [n for n in names if n not in self.sup.fleet.groups]
        if unknown:
            raise ReloadError(f"no group {unknown[0]!r}; groups: "
                              f"{', '.join(self.sup.fleet.groups)}")
        with self.keeper.cond:
            self._interrupted = None
        t0 = time.monotonic()
        old_zygote = self._fresh_zygote()
        done: list[str] = []
        try:
            for name in names:
                done.append(self._reload_group(self.sup.fleet.groups[name]))
        except BaseException:
            self._put_back(old_zygote)
            raise
        finally:
            self._join_retiring()
        if old_zygote is not None:
            old_zygote.stop()  # every group is on the new code: the old zygote's work is done
        return f"{'; '.join(done)} in {time.monotonic() - t0:.2f}s"

    def _fresh_zygote(self) -> Any:
        """Fork replacements (and anything else) from a new zygote generation from now on;
        return the old zygote, to close on success or put back on failure. None: no zygote
        (workers are exec'd: fresh interpreters are new code already)."""
        spawner = self.sup.spawner
        if not self.sup.use_zygote or spawner is None or spawner.zygote is None:
            return None
        fresh = spawner.fresh_zygote(self.sup.specs.values(), self.sup.zygote_preload)
        return spawner.swap_zygote(fresh)

    def _put_back(self, old_zygote: Any) -> None:
        """An aborted reload: the old zygote forks again (restarts of old workers)."""
        if old_zygote is None:
            return
        fresh = self.sup.spawner.swap_zygote(old_zygote)
        if fresh is not None:
            fresh.stop()

    def _reload_group(self, group: Group) -> str:
        if not self.keeper.running:
            raise ReloadError(f"reload {group.name}: the fleet is not running")
        with self.keeper.cond:
            olds = group.wanted()
            group.generation += 1
            gen = group.generation
        if not olds:
            return f"{group.name}: no workers (generation {gen})"
        surge = group.spec.max_surge
        n = len(olds)
        self.sup.log(f"reload {group.name}: replacing {n} worker{'s' if n != 1 else ''} with "
                     f"generation {gen}, {surge} at a time")
        steps = []
        for i in range(0, len(olds), surge):
            t = time.monotonic()
            self.replace(olds[i:i + surge], wait=False)  # the next surge starts as they stop
            steps.append(time.monotonic() - t)
        self._join_retiring()
        return (f"{group.name}: {n} worker{'s' if n != 1 else ''} on generation {gen}, "
                f"{max(steps):.2f}s per step at most")

    # -- the reusable step ------------------------------------------------------------------

    def replace(self, olds: list[WorkerSlot], wait: bool = True) -> list[WorkerSlot]:
        """Surge one new worker per slot of ``olds`` (all of one group), wait until each is
        STARTED (ready, for a program), then stop ``olds`` gracefully (``wait=False``: in a
        thread, joined at the end of the reload); return the new slots. ReloadError (the
        replacements stopped, ``olds`` untouched) if one fails to start."""
        self._check()
        group = self.sup.fleet.group_of(olds[0])
        spec = group.spec
        trial = with_fields(spec, restart="temporary")  # on trial: a crash fails the reload
        with self.keeper.cond:
            self._leaving.update(w.name for w in olds)
            news = [group.add_slot(self._free_index(group), spec=trial) for _ in olds]
        self.keeper.changed(*news)
        t0 = time.monotonic()
        try:
            self.keeper.spawn_missing()
            self._wait_started(news, t0 + spec.start_timeout)
        except BaseException:
            self._retire(group, news, failed=True)
            raise
        with self.keeper.cond:
            for w in news:
                w.spec = spec  # on the job: restarted as its group says
        self.sup.log(f"{', '.join(w.name for w in news)} STARTED (generation "
                     f"{news[0].generation}); stopping {', '.join(w.name for w in olds)}")
        retiring = threading.Thread(target=self._retire, args=(group, olds),
                                    name="multibus-retire", daemon=True)
        retiring.start()
        if wait:
            retiring.join()
        else:
            self._retiring.append(retiring)
        return news

    def _free_index(self, group: Group) -> int:
        """The lowest index of ``group`` with no slot and no worker still leaving."""
        i = 0
        while i in group.slots or f"{group.name}.{i}" in self._leaving:
            i += 1
        return i

    def _join_retiring(self) -> None:
        """Until the old workers being stopped are gone (each within its stop_timeout, then
        SIGTERM, then SIGKILL)."""
        while self._retiring:
            self._retiring.pop(0).join()

    def _retire(self, group: Group, slots: list[WorkerSlot], failed: bool = False) -> None:
        """Stop ``slots`` gracefully ('exit': their bus stops, in-flight work finishes),
        escalating after their stop_timeout, and forget them. ``failed`` replacements that
        have not joined (still in their target, which no command reaches) get SIGTERM now."""
        with self.keeper.cond:
            group.retire(slots)
            unjoined = [w.child for w in slots if failed and w.alive and w.state is S.SPAWNING]
        for child in unjoined:
            if child is not None:
                signal_group(child.pgid, signal.SIGTERM)
        try:
            self.sup.remove(slots)  # exit, escalate, forget at the hub
        finally:
            with self.keeper.cond:
                self._leaving.difference_update(w.name for w in slots)
        self.keeper.changed()

    def _check(self) -> None:
        if self._interrupted:
            raise ReloadError(f"reload interrupted: {self._interrupted}")
        if self.keeper.fatal:
            raise ReloadError(self.keeper.fatal)

    def _wait_started(self, news: list[WorkerSlot], deadline: float) -> None:
        """Until every one of ``news`` is STARTED; ReloadError with the worker's own error
        as soon as one fails to start or dies, at ``deadline`` (start_timeout), or when the
        reload is interrupted."""
        k = self.keeper
        failed: WorkerSlot | None = None
        with k.cond:
            while True:
                self._check()
                if not k.running:
                    raise ReloadError("the fleet stopped during the reload")
                for w in news:
                    if w.start_error is not None:
                        raise ReloadError(f"replacement {w.name} failed to start: "
                                          f"{w.start_error}; the old workers keep serving")
                    if w.child is not None and not w.alive:
                        failed = w
                        break
                if failed is not None or all(w.state is S.STARTED for w in news):
                    break
                now = time.monotonic()
                if now >= deadline:
                    late = [w for w in news if w.state is not S.STARTED]
                    raise ReloadError(
                        "replacement not STARTED within its start_timeout: "
                        + "; ".join(w.describe() for w in late)
                        + "; the old workers keep serving")
                k.cond.wait(deadline - now)
        if failed is not None:
            child = failed.child
            if child is not None:
                child.drained.wait(DRAIN_WAIT)  # its last lines: the error
            raise ReloadError(f"replacement {failed.describe()}; the old workers keep serving")

