"""One group or one worker at a time: start, stop, restart, graceful and signal by target.

A target is a group (``job``) or a worker (``job.2``). Stopping one *holds* it
(:attr:`Group.held <multibus.fleet.Group.held>`, :attr:`WorkerSlot.held
<multibus.fleet.WorkerSlot.held>`): its worker buses go STOPPED, their processes stay, and
nothing of it is spawned or restarted until it is started again; starting a group also clears
FATAL and its restart count. Groups start in ``after`` order (:mod:`multibus.order`), each wave
once the one before is STARTED, and stop in the reverse order; the whole fleet's start and
stop go through :meth:`GroupOps.start_fleet` and :meth:`GroupOps.stop_waves` for that.
Everything here runs on the supervisor's main thread (the operation queue), like the bus's own
transitions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from multibus import order
from multibus.child import Child, signal_group
from multibus.fleet import WorkerSlot, WorkerState
from multibus.keeper import FleetError
from multibus.names import WorkerName
from multibus.specs import SpecError

if TYPE_CHECKING:
    from multibus.supervisor import Supervisor

__all__ = ["GroupOps", "Selection"]

#: group -> None (the whole group) or the indices of the workers named
Selection = dict[str, "set[int] | None"]


class GroupOps:
    """Per-target transitions of supervisor ``sup``'s fleet."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.fleet = sup.fleet
        self.keeper = sup.keeper

    # -- targets --------------------------------------------------------------------------

    def select(self, targets: Iterable[str]) -> Selection:
        """Targets -> :data:`Selection`; SpecError naming an unknown group or worker."""
        sel: Selection = {}
        groups = self.fleet.groups
        for t in targets:
            wn = WorkerName.parse(t)
            name = t if wn is None else wn.group
            if name not in groups:
                raise SpecError(f"no group {name!r}; groups: {', '.join(groups)}")
            if wn is None:
                sel[name] = None
                continue
            if wn.index not in groups[name].slots or not groups[name].slots[wn.index].wanted:
                known = ", ".join(s.name for s in groups[name].wanted()) or "none"
                raise SpecError(f"no worker {t!r}; workers of {name}: {known}")
            if name not in sel or sel[name] is not None:
                sel.setdefault(name, set()).add(wn.index)  # type: ignore[union-attr]
        return sel

    def _slots(self, sel: Selection, group: str) -> list[WorkerSlot]:
        g = self.fleet.groups[group]
        chosen = sel.get(group)
        return [w for w in g.wanted() if chosen is None or w.wn.index in chosen]

    def waves(self, among: Iterable[str] | None = None) -> list[list[str]]:
        """The groups (``among``, default all) in start order (:func:`multibus.order.waves`)."""
        return order.waves({n: g.spec.after for n, g in self.fleet.groups.items()}, among)

    # -- the whole fleet (Supervisor.start / stop) ----------------------------------------

    def start_fleet(self, t0: float) -> None:
        """Start every group that is not held: all at once without ``after`` (the hub's
        default desired state reaches late joiners), else wave by wave, each worker told."""
        k = self.keeper
        waves = self.waves()
        held = any(g.held or any(w.held for w in g.slots.values())
                   for g in self.fleet.groups.values())
        if len(waves) <= 1 and not held and not k.per_peer:
            self.sup.tell("start")
            k.spawn_missing()
            k.wait_started(None, t0)  # each worker's start_timeout from its own spawn
            return
        k.per_peer = True
        for wave in waves:
            slots = [w for g in wave for w in self.fleet.groups[g].wanted()
                     if not self.fleet.down(w)]
            self._start_slots(slots, t0)
        if not held:
            self.sup.tell("start")  # the default for workers that join later

    def stop_waves(self) -> list[list[str]] | None:
        """The groups in stop order, wave by wave; None when there is one wave (all at
        once, as the hub's default desired state)."""
        waves = self.waves()
        return None if len(waves) <= 1 else list(reversed(waves))

    def graceful_fleet(self) -> None:
        """Bus 'graceful' on every worker; only on those not stopped when some are."""
        if not self.down():
            self.sup.tell("graceful")
            return
        self.sup.tell("graceful", [w for w in self.fleet.live() if not self.fleet.down(w)])

    def fatal(self, name: str, msg: str) -> None:
        """(process thread) Group ``name`` reached its restart intensity: FATAL. Its workers
        are told to exit, then SIGTERM, SIGKILL; none is restarted; the other groups run
        on. The fleet stops only when every group is FATAL."""
        k = self.keeper
        with k.cond:
            group = self.fleet.groups[name]
            if group.fatal is not None:
                return
            group.fatal = msg
            slots = list(group.slots.values())
            for w in slots:
                w.cancel_restart()
            alive = [w for w in slots if w.alive and w.child is not None]
            live = [w.child for w in alive]
            every = all(g.fatal is not None for g in self.fleet.groups.values())
        self.sup.log(f"group {name} is FATAL: {msg}; the other groups keep running "
                     f"(`multibus start {name}` starts it again)", 40)
        k.changed(*slots)
        if every:
            k.fatal_error(f"every group is FATAL; last: {msg}")
            return
        if live:
            self.sup.tell("exit", alive)
        for child in live:
            k.procs.call_later(group.spec.stop_timeout, lambda c=child: self._term(c))

    def _term(self, child: Child) -> None:
        """SIGTERM ``child``'s process group if it still runs; SIGKILL after term_timeout."""
        if child.returncode is None:
            signal_group(child.pgid, 15)
            self.keeper.procs.call_later(self.sup.term_timeout, lambda: child.returncode is None
                                         and signal_group(child.pgid, 9))

    def stop_fleet(self, action: str, done: frozenset[WorkerState]) -> None:
        """Stop (or exit: ``action``) every group in reverse ``after`` order, each wave once
        the one after it is ``done``; then make ``action`` the default for later workers."""
        for wave in self.stop_waves() or ():
            slots = [w for g in wave for w in self.fleet.groups[g].slots.values() if w.alive]
            if slots:
                self.sup.tell(action, slots)
                if not self.sup.stop_slots(slots, done):
                    return  # interrupted: every worker was killed
        self.sup.tell(action)

    def exit_fleet(self) -> None:
        """Have every worker exit in reverse ``after`` order, each wave gone before the next."""
        for wave in self.stop_waves() or ():
            live = [w for g in wave for w in self.fleet.groups[g].slots.values() if w.alive]
            self.sup.exit_slots(live, peers=True)

    def hold_all_but(self, sel: Selection) -> None:
        """Before a fleet start that should start only ``sel``: hold everything else."""
        with self.keeper.cond:
            for name, g in self.fleet.groups.items():
                if name not in sel:
                    g.held = True
                    continue
                g.held = False
                chosen = sel[name]
                for w in g.slots.values():
                    w.held = chosen is not None and w.wn.index not in chosen

    def release_all(self) -> None:
        """A start of the whole fleet: nothing held, nothing FATAL, no restarts counted."""
        with self.keeper.cond:
            for g in self.fleet.groups.values():
                g.held = False
                g.fatal = None
                for w in g.slots.values():
                    w.held = False
        self.sup.restart_policy.reset()

    def down(self) -> list[str]:
        """Groups stopped by a command or FATAL, and workers stopped by a command."""
        out = []
        for g in self.fleet.groups.values():
            if g.down:
                out.append(g.name)
            else:
                out.extend(w.name for w in g.wanted() if w.held)
        return out

    # -- per target -----------------------------------------------------------------------

    def start(self, targets: Iterable[str], bus_state: str) -> str | None:
        """Start ``targets`` (clearing their hold and FATAL), in ``after`` order; a group
        whose ``after`` groups are not STARTED (and not started here) is refused."""
        sel = self.select(targets)
        for name, chosen in sel.items():
            g = self.fleet.groups[name]
            if chosen is not None and g.down:
                raise SpecError(f"{name}.{min(chosen)}: its group {name} is {g.state()}; "
                                f"start the group (multibus start {name})")
        if bus_state != "STARTED":  # the fleet is stopped: start it with only these
            self.hold_all_but(sel)
            self.sup.bus.start()
            return None
        for name in sel:
            for dep in self.fleet.groups[name].spec.after:
                state = self.fleet.groups[dep].state()
                if dep not in sel and state != "STARTED":
                    raise SpecError(f"cannot start {name}: it runs after {dep}, which is "
                                    f"{state}; start {dep} first (multibus start {dep} {name})")
        with self.keeper.cond:
            for name, chosen in sel.items():
                g = self.fleet.groups[name]
                if chosen is None:
                    g.held = False
                    g.fatal = None
                    self.sup.restart_policy.reset(name)
                for w in self._slots(sel, name):
                    w.held = False
        self.keeper.per_peer = True
        t0 = time.monotonic()
        for wave in self.waves(sel):
            slots = [w for g in wave for w in self._slots(sel, g)]
            self._start_slots(slots, t0)
        self.keeper.changed()
        return None

    def _start_slots(self, slots: list[WorkerSlot], t0: float) -> None:
        """Tell the live ones of ``slots`` to start, spawn the missing, wait for all."""
        live = [w for w in slots if w.alive]
        if live:
            self.sup.tell("start", live)
        self.keeper.spawn_missing(slots)
        self.keeper.wait_started(slots, t0)

    def stop(self, targets: Iterable[str]) -> list[tuple[str, str]]:
        """Hold ``targets`` and stop their worker buses (processes stay), in reverse
        ``after`` order; late ones are escalated (SIGTERM, SIGKILL) as a fleet stop does.
        Returns the (worker, why) of each that had to be killed."""
        sel = self.select(targets)
        with self.keeper.cond:
            for name, chosen in sel.items():
                if chosen is None:
                    self.fleet.groups[name].held = True
                for w in self._slots(sel, name):
                    w.held = True
                    w.cancel_restart()
        self.keeper.per_peer = True
        before = len(self.sup.kills)
        for wave in reversed(self.waves(sel)):
            slots = [w for g in wave for w in self._slots(sel, g) if w.alive]
            if slots:
                self.sup.tell("stop", slots)
                self.sup.stop_slots(slots)
        self.keeper.changed()
        return self.sup.kills[before:]

    def graceful(self, targets: Iterable[str]) -> str | None:
        """Bus 'graceful' on the STARTED workers of ``targets``."""
        sel = self.select(targets)
        started = [w for g in sel for w in self._slots(sel, g)
                   if w.alive and w.state is WorkerState.STARTED]
        if not started:
            return "nothing to reload: no worker of " + ", ".join(sorted(sel)) + " is STARTED"
        self.sup.tell("graceful", started)
        return None

    def signal(self, targets: Iterable[str], signum: int) -> str:
        """Send ``signum`` to the process group of each live worker of ``targets``."""
        sel = self.select(targets)
        sent = []
        for g in sel:
            for w in self._slots(sel, g):
                child = w.child
                if w.alive and child is not None:
                    try:
                        os.killpg(child.pgid, signum)
                    except ProcessLookupError:
                        continue
                    sent.append(w.name)
        if not sent:
            raise FleetError(f"no live worker in {', '.join(sorted(sel))} to signal")
        return f"sent to {', '.join(sent)}"

    def group_row(self, name: str) -> dict[str, Any]:
        """Group ``name``'s state (STARTED, STOPPED, FATAL...), error (why FATAL), after."""
        with self.keeper.cond:
            g = self.fleet.groups.get(name)
            if g is None:
                return {}
            return {"state": g.state(), "error": g.fatal, "after": list(g.spec.after)}
