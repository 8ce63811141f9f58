"""The fleet model: worker groups, their desired counts, and one slot per worker.

Plain data with no processes, threads or locks (the supervisor holds its lock around every
change). A :class:`Group` is a :class:`~multibus.specs.WorkerSpec` with the number of workers
wanted now; each worker is a :class:`WorkerSlot` named ``group.index``
(:class:`~multibus.names.WorkerName`) whose :class:`WorkerState` is either the supervisor's
own view of its process (SPAWNING, JOINED, BACKOFF, EXITED) or the state its bus reported.
The status table row of a worker is built here, once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from multibus.bus import state_name
from multibus.child import Child
from multibus.names import WorkerName
from multibus.specs import WorkerSpec
from multibus.wakeup import Handle

__all__ = ["Fleet", "Group", "WorkerSlot", "WorkerState"]


class WorkerState(enum.StrEnum):
    """A worker's state as shown in the status table (its str is the wire/JSON form)."""

    # the supervisor's view of the process
    EXITED = "EXITED"  # no process (not spawned yet, or it exited)
    SPAWNING = "SPAWNING"  # spawned, not yet joined the hub
    JOINED = "JOINED"  # joined, its bus has not reported a state yet
    BACKOFF = "BACKOFF"  # dead, a restart is scheduled
    # what the worker's bus reported (multibus.bus.states)
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    STOPPING = "STOPPING"
    EXITING = "EXITING"

    @classmethod
    def of_bus(cls, state: object) -> WorkerState | None:
        """The state a worker's bus reported (a bus State or its name); None if unknown."""
        name = state_name(state)
        return None if name is None else cls(name)



@dataclass(eq=False)
class WorkerSlot:
    """One worker of a group, across the processes that successively run it."""

    wn: WorkerName
    spec: WorkerSpec
    child: Child | None = None
    state: WorkerState = WorkerState.EXITED
    restarts: int = 0
    exit_code: int | None = None
    pid: int | None = None
    since: float | None = None
    wanted: bool = True  # False once scaled away: removed when its process is gone
    pending: Handle | None = None  # a scheduled restart
    start_error: str | None = None  # its process reported that its bus failed to start
    launch: str | None = None  # how its process was started: 'fork' or 'exec (why)'
    stuck: str | None = None  # why its process looks stuck (the hub's 'peer.slow'), or None
    replacing: str | None = None  # why it is being replaced (multibus.recycle), or None
    held: bool = False  # stopped by `multibus stop group.i`: not spawned or restarted
    last_lines: list[str] = field(default_factory=list)
    generation: int = 0  # its group's code generation when it was made (multibus reload)

    @property
    def name(self) -> str:
        return str(self.wn)

    @property
    def alive(self) -> bool:
        """It has a process that has not been reaped."""
        return self.child is not None and self.child.returncode is None

    def cancel_restart(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
            if self.state is WorkerState.BACKOFF:
                self.state = WorkerState.EXITED

    def tail(self, lines: int = 3) -> str:
        """Its last non-blank output lines, joined: what explains a failure."""
        return " / ".join(line for line in self.last_lines[-lines:] if line.strip())

    def describe(self) -> str:
        """'w.0 is SPAWNING (last exit code 2): <its last lines>', for an error message."""
        tail = self.tail()
        last = "" if self.child is None or self.alive else f" (last {self.child.describe_exit()})"
        return f"{self.name} is {self.state.value}{last}" + (f": {tail}" if tail else "")

    def row(self, now: float) -> dict[str, Any]:
        """The status table row: name, group, pid, state, restarts, exit_code, uptime,
        launch (how its current or last process was started; None before any), and
        ``stuck`` (why) only while its process does not read what is sent to it."""
        alive = self.alive
        row = {
            "name": self.name,
            "group": self.wn.group,
            "pid": self.pid if alive else None,
            "state": self.state.value,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "uptime": round(now - self.since, 3) if alive and self.since is not None else 0.0,
            "launch": self.launch,
        }
        if self.stuck and alive:
            row["stuck"] = self.stuck
        return row


class Group:
    """A spec's workers: ``count`` wanted, plus any scaled away whose process still runs."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.count = 0
        self.slots: dict[int, WorkerSlot] = {}
        self.held = False  # stopped by `multibus stop GROUP`: not spawned or restarted
        self.fatal: str | None = None  # why it went FATAL (its restart intensity): down too
        self.generation = 0  # code generation new workers get; a rolling reload moves it on
        self.resize(spec.count)

    @property
    def down(self) -> bool:
        """Stopped by a command or FATAL: none of its workers is spawned or restarted."""
        return self.held or self.fatal is not None

    def state(self) -> str:
        """FATAL; STOPPED (held, or all its workers stopped); STARTED (every wanted worker
        not stopped by a command is); else STARTING or STOPPING, as its workers move."""
        if self.fatal is not None:
            return "FATAL"
        states = {s.state for s in self.wanted() if not s.held}
        if not states:
            return "STOPPED" if self.held else "STARTED"
        if states == {WorkerState.STARTED} and not self.held:
            return "STARTED"
        if states <= {WorkerState.STOPPED, WorkerState.EXITED}:
            return "STOPPED"
        moving = {WorkerState.STOPPING, WorkerState.EXITING}
        return "STOPPING" if (self.held or states & moving) else "STARTING"

    @property
    def name(self) -> str:
        return self.spec.name

    def wanted(self) -> list[WorkerSlot]:
        return sorted((s for s in self.slots.values() if s.wanted), key=lambda s: s.wn.index)

    def resize(self, count: int) -> tuple[list[WorkerSlot], list[WorkerSlot]]:
        """Want ``count`` workers: return (removed, added).

        The highest-numbered are removed: no longer wanted, their restart cancelled, and
        dropped at once unless a process still runs (then at its exit, :meth:`discard`). New
        workers take the lowest free indices."""
        current = self.wanted()
        removed = current[count:]
        self.retire(removed)
        added = []
        i = 0
        while len(current) - len(removed) + len(added) < count:
            if i not in self.slots:
                added.append(self.add_slot(i))
            i += 1
        self.count = count
        return removed, added

    def add_slot(self, index: int | None = None, spec: WorkerSpec | None = None) -> WorkerSlot:
        """A new slot at ``index`` (default: the lowest free one) of this group's current
        generation, without changing ``count``: a rolling reload's replacement (whose
        ``spec`` may differ while it is on trial) or one of :meth:`resize`'s."""
        if index is None:
            index = next(i for i in range(len(self.slots) + 1) if i not in self.slots)
        slot = WorkerSlot(WorkerName(self.name, index), spec or self.spec,
                          generation=self.generation)
        self.slots[index] = slot
        return slot

    def retire(self, slots: Iterable[WorkerSlot]) -> None:
        """No longer want ``slots``: their restarts cancelled, dropped at once unless a
        process still runs (then at its exit, :meth:`discard`)."""
        for s in slots:
            s.wanted = False
            s.cancel_restart()
            if not s.alive:
                self.discard(s)

    def discard(self, slot: WorkerSlot) -> None:
        if self.slots.get(slot.wn.index) is slot:
            del self.slots[slot.wn.index]


class Fleet(Mapping[str, WorkerSlot]):
    """Every group in spec order; as a mapping, worker name -> slot (group by group, by
    index). Reading it takes no lock (a snapshot of each dict), so a signal handler can."""

    def __init__(self, specs: Iterable[WorkerSpec]) -> None:
        self.groups: dict[str, Group] = {s.name: Group(s) for s in specs}

    def slots(self) -> list[WorkerSlot]:
        out: list[WorkerSlot] = []
        for g in list(self.groups.values()):
            out.extend(sorted(list(g.slots.values()), key=lambda s: s.wn.index))
        return out

    def __iter__(self) -> Iterator[str]:
        return iter([s.name for s in self.slots()])

    def __len__(self) -> int:
        return sum(len(g.slots) for g in list(self.groups.values()))

    def __getitem__(self, name: str) -> WorkerSlot:
        wn = WorkerName.parse(name)
        group = None if wn is None else self.groups.get(wn.group)
        if group is None or wn.index not in group.slots:  # type: ignore[union-attr]
            raise KeyError(name)
        return group.slots[wn.index]  # type: ignore[union-attr]

    def current(self, name: str, pid: int | None = None,
                joined: bool = False) -> WorkerSlot | None:
        """The slot of worker ``name`` if its process runs; with ``pid``, only if that is
        its process (not a stale report from a previous process of that name). 'peer.state'
        and 'peer.lost' carry no pid: ask with ``joined`` for them, since until the current
        process joins (its 'peer.joined' names its pid) they can only be about an old one."""
        w = self.get(name)
        if w is None or not w.alive or (pid is not None and pid != w.pid):
            return None
        return None if joined and w.state is WorkerState.SPAWNING else w

    def peer_joined(self, name: str, pid: int | None) -> WorkerSlot | None:
        """The hub saw ``name`` (process ``pid``) join: SPAWNING -> JOINED. The slot if
        that changed it, else None."""
        w = self.current(name, pid)
        if w is None or w.state is not WorkerState.SPAWNING:
            return None
        w.state = WorkerState.JOINED
        return w

    def peer_state(self, name: str, state: object) -> WorkerSlot | None:
        """Worker ``name``'s bus reported ``state``: the slot if that changed it."""
        w = self.current(name, joined=True)
        new = WorkerState.of_bus(state)
        if w is None or new is None:
            return None
        w.state = new
        return w

    def group_of(self, slot: WorkerSlot) -> Group:
        return self.groups[slot.wn.group]

    def down(self, slot: WorkerSlot) -> bool:
        """``slot`` or its group was stopped by a command, or its group is FATAL."""
        group = self.groups.get(slot.wn.group)
        return slot.held or group is None or group.down

    def awaited(self, slot: WorkerSlot) -> bool:
        """A start waits for ``slot``: wanted, not STARTED, not stopped by a command (a
        FATAL group's are awaited: the wait fails)."""
        group = self.groups.get(slot.wn.group)
        return (slot.wanted and slot.state is not WorkerState.STARTED and not slot.held
                and not (group is not None and group.held))

    def live(self) -> list[WorkerSlot]:
        return [s for s in self.slots() if s.alive]

    def rows(self, now: float) -> list[dict[str, Any]]:
        return [s.row(now) for s in self.slots()]
