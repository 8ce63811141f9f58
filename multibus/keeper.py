"""Keeper: keeps a running fleet as wanted, reacting to what happens to its workers.

The :class:`~multibus.supervisor.Supervisor` turns the parent bus's transitions into
commands; the keeper handles the events that come from elsewhere, in other threads:

- from the :class:`~multibus.procs.ProcessManager` thread: output lines, exits (the dead are
  restarted as the :class:`~multibus.restart.RestartPolicy` says, or the fleet is stopped
  with the reason), and the restarts and spawns it runs there;
- from the hub bridge ('peer.*' on the bus): joins, bus states, error records, a command
  that failed in a worker (a start listener raised: the start fails at once), lost contact.

Its condition ``cond`` guards the :class:`~multibus.fleet.Fleet`; every change notifies it
(``start``/``stop``/``scale`` wait on it) and publishes the status table on 'workers'.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from multibus.bus import state_name
from multibus.child import Child, signal_group
from multibus.fleet import Fleet, WorkerSlot, WorkerState
from multibus.procs import ProcessManager
from multibus.programs import Programs
from multibus.restart import GiveUp, RestartPolicy
from multibus.spawner import Spawner

__all__ = ["FleetError", "HubBridge", "Keeper"]

S = WorkerState
SPAWN_CHUNK = 64  # workers spawned per turn of the manager thread


class FleetError(RuntimeError):
    """The fleet could not start, or had to be stopped (restart intensity reached).

    Its message says everything: raised by a 'start' listener, the bus does not log it with
    a traceback; ``bus.start()`` raises it and its caller reports it, once."""

    reported_by_caller = True


class HubBridge(Protocol):
    """What the supervisor needs of its hub (:class:`multibus.transport.bridge.Bridge` with
    ``role='hub'``; a supervisor's ``bridge_factory`` may build another implementation)."""

    endpoints: Any  # .to_string() gives what a worker connects to

    def subscribe(self) -> Any: ...

    def command(self, action: str, peers: Iterable[str] | None = None,
                wait: float | None = None) -> bool | None: ...

    def peers(self) -> dict[str, dict[str, Any]]: ...

    def forget(self, name: str) -> None: ...

    def expect(self, name: str, secret: str) -> None: ...

    def share_with(self, uid: int, gid: int) -> Any: ...  # endpoints for another user's workers

    def stats(self) -> dict[str, int]: ...


class Keeper:
    """The fleet ``fleet`` of supervisor ``name`` on ``bus``, while it runs.

    ``spawner`` and ``bridge`` are set once the supervisor has them (:meth:`attach`)."""

    def __init__(self, bus: Any, name: str, fleet: Fleet, policy: RestartPolicy, *,
                 log: Callable[[str, int], None], log_output: bool,
                 term_timeout: float) -> None:
        self.bus = bus
        self.name = name
        self.fleet = fleet
        self.policy = policy
        self.log = log
        self.log_output = log_output
        self.speaking: Child | None = None  # the process whose output on_lines is logging
        self.term_timeout = term_timeout
        self.cond = threading.Condition(threading.RLock())
        self.running = False  # spawns and restarts allowed (between start and stop)
        # once groups start or stop on their own (after, holds), each spawn is told 'start'
        # itself: the hub's default desired state no longer fits every worker
        self.per_peer = False
        self.on_group_fatal: Callable[[str, str], None] = lambda group, why: self.fatal_error(why)
        self.fatal: str | None = None  # why the fleet had to be stopped
        self.failed = False
        self.spawner: Spawner | None = None
        self.bridge: HubBridge = None  # type: ignore[assignment]
        self._watches: list[set[WorkerSlot | None]] = []  # see watch()
        self._joined: set[str] = set()  # names with a record at the hub (forget on respawn)
        # name -> (pid, bus state): events of a process not (yet) recorded as its worker's
        self._early: dict[str, tuple[int | None, str | None]] = {}
        self.programs = Programs(self)  # the cmd groups' workers, which have no bus

    def attach(self, spawner: Spawner, bridge: HubBridge) -> None:
        self.spawner, self.bridge = spawner, bridge

    @property
    def procs(self) -> ProcessManager:
        assert self.spawner is not None, "not attached"
        return self.spawner.procs

    # -- the table, spawning, waiting (any thread) -----------------------------------------

    def table(self) -> list[dict[str, Any]]:
        """One row per worker (:meth:`~multibus.fleet.WorkerSlot.row`)."""
        with self.cond:
            return self.fleet.rows(time.monotonic())

    def changed(self, *slots: WorkerSlot) -> None:
        """Something changed (in ``slots``; none named: anything): wake the waiters, each
        told what to look at again (:meth:`watch`), publish 'workers.changed' (no payload:
        for whoever only needs to know, e.g. a host's report to its parent) and the table
        on 'workers'."""
        with self.cond:
            for touched in self._watches:
                touched.update(slots or (None,))
            self.cond.notify_all()
            rows = self.table() if self.bus.listeners.get("workers") else None
        try:  # (a table per change, built for nobody, was a fleet stop's main cost)
            self.bus.publish("workers.changed")
            if rows is not None:
                self.bus.publish("workers", rows)
        except Exception:  # noqa: BLE001 - a bad listener must not break us
            pass

    @contextmanager
    def watch(self) -> Iterator[set[WorkerSlot | None]]:
        """A set that collects the slots changed from now on (None: anything may have): a
        waiter re-examines only those, so waiting on N workers costs O(1) per event, not
        O(N). Hold ``cond`` around the ``with``; take what is there with :meth:`touched`."""
        touched: set[WorkerSlot | None] = set()
        self._watches.append(touched)
        try:
            yield touched
        finally:
            self._watches.remove(touched)

    @staticmethod
    def touched(watch: set[WorkerSlot | None]) -> set[WorkerSlot | None]:
        """Empty ``watch`` and return what it had collected."""
        got = set(watch)
        watch.clear()
        return got

    def _spawn(self, w: WorkerSlot) -> None:
        """Spawn ``w`` (manager thread only)."""
        self._spawn_batch([w])

    def _spawn_batch(self, slots: list[WorkerSlot]) -> None:
        """Spawn each of ``slots`` still wanted without a process (manager thread only), the
        zygote's forks pipelined; one 'workers' change for the batch."""
        assert self.spawner is not None and self.procs.in_thread()
        todo = []
        for w in slots:
            w.pending = None
            if (w.wanted and self.fleet.get(w.name) is w and self.running and not w.alive
                    and not self.fleet.down(w)):
                todo.append(w)
        if not todo:
            return
        for w in todo:
            with self.cond:
                self._early.pop(w.name, None)
                known = w.name in self._joined
                self._joined.discard(w.name)
            if known:  # a previous process's record (and desired state) at the hub
                self.bridge.forget(w.name)
        buses = self.programs.split(todo)[0]  # programs have no bus: no hub record for them
        if self.per_peer and buses:
            self.bridge.command("start", peers=[w.name for w in buses])
        children = self.spawner.spawn_many([(w.name, w.spec) for w in todo],
                                           self.bridge.endpoints.to_string())
        for w, child in zip(todo, children, strict=True):
            if isinstance(child, OSError):
                msg = f"cannot spawn worker {w.name}: {child}"
                self.log(msg, 40)
                w.last_lines = [msg]
                w.exit_code = 127
                with self.cond:
                    w.state = S.EXITED
                self.fatal_error(msg)
                continue
            child.data["worker"] = w
            with self.cond:
                w.child, w.pid, w.since, w.state = child, child.pid, child.started, S.SPAWNING
                w.start_error = w.stuck = None
                w.launch = child.data.get("launch")
                # A forked worker can join (and report STARTED) before we get here: its
                # events found no process of that pid and were kept aside (_note_early).
                early = self._early.pop(w.name, None)
                if early is not None and early[0] == child.pid:
                    w.state = WorkerState.of_bus(early[1]) or S.JOINED
            if child.data.get("program"):
                self.programs.spawned(w, child)
        self.changed(*todo)

    def spawn_missing(self, slots: Iterable[WorkerSlot] | None = None) -> None:
        """Spawn every wanted worker (of ``slots``; None: of the fleet) that has no live
        process and is not down (from any thread), in chunks of :data:`SPAWN_CHUNK` so the
        manager thread handles exits and output in between."""
        done = threading.Event()
        todo = [w for w in (self.fleet.slots() if slots is None else slots)
                if w.wanted and not w.alive and not self.fleet.down(w)]
        if not todo:
            return

        def run() -> None:
            try:
                chunk = todo[:SPAWN_CHUNK]
                del todo[:SPAWN_CHUNK]
                for w in chunk:
                    w.cancel_restart()
                self._spawn_batch(chunk)
            except BaseException:
                todo.clear()
                raise
            finally:
                if todo:
                    self.procs.call_soon(run)
                else:
                    done.set()

        self.procs.call_soon(run)
        while not done.wait(0.5):
            if not self.procs.thread.is_alive():
                raise FleetError("the process thread died")

    @staticmethod
    def _deadline(w: WorkerSlot, t0: float) -> float:
        """``w``'s start_timeout counted from its own spawn (from ``t0`` for a process
        spawned earlier): a large fleet is not failed by the time it takes to spawn it."""
        return max(t0, w.since or t0) + w.spec.start_timeout

    def wait_started(self, slots: list[WorkerSlot] | None, t0: float,
                     limit: float | None = None) -> None:
        """Until every wanted one of ``slots`` (None: of the fleet, as it is then) is
        STARTED; FleetError when one failed to start (at once), is late, or the fleet failed.
        Late: past its start_timeout from its own spawn (:meth:`_deadline`), or past
        ``limit`` (a monotonic time) if given. Each change costs O(1): only the workers it
        touched are looked at again; all of them only when the earliest deadline comes."""
        among = None if slots is None else set(slots)

        def deadline(w: WorkerSlot) -> float:
            return self._deadline(w, t0) if limit is None else limit

        with self.cond, self.watch() as watch:
            pending: set[WorkerSlot] = set()
            check = float("-inf")  # when deadlines must be looked at again (all of them)
            while True:
                if self.fatal:
                    raise FleetError(self.fatal)
                now = time.monotonic()
                touched = self.touched(watch)
                full = None in touched or now >= check
                if full:  # O(N): at the start, on 'anything changed', at a deadline
                    every = self.fleet.slots() if slots is None else slots
                    pending = {w for w in every if self.fleet.awaited(w)}
                    touched = set(pending)
                    check = float("inf")
                for w in touched:
                    if w is None or (among is not None and w not in among):
                        continue
                    if self.fleet.awaited(w):
                        group = self.fleet.groups.get(w.wn.group)
                        if group is not None and group.fatal is not None:
                            raise FleetError(f"group {group.name} is FATAL: {group.fatal}")
                        pending.add(w)
                        check = min(check, deadline(w))
                        if w.start_error is not None:
                            raise FleetError(f"fleet {self.name!r}: worker {w.name} failed "
                                             f"to start: {w.start_error}")
                    else:
                        pending.discard(w)
                if not pending:
                    return
                if full:
                    self._raise_late([w for w in every if w in pending], deadline, now, t0)
                self.cond.wait(max(0.0, check - now))

    def _raise_late(self, waiting: list[WorkerSlot], deadline: Callable[[WorkerSlot], float],
                    now: float, t0: float) -> None:
        """FleetError naming the workers of ``waiting`` past their deadline, if any."""
        late = [w for w in waiting if now >= deadline(w)]
        if not late:
            return
        more = f" (and {len(late) - 5} more)" if len(late) > 5 else ""
        waited = now - max(t0, late[0].since or t0)
        raise FleetError(
            f"fleet {self.name!r}: {len(late)} worker(s) not STARTED after "
            f"{waited:.1f}s (start_timeout): "
            + "; ".join(self._why_late(w, now - max(t0, w.since or t0))
                        for w in late[:5]) + more)

    @staticmethod
    def _why_late(w: WorkerSlot, waited: float) -> str:
        """What keeps ``w`` from STARTED. A live worker that has not joined is still in its
        target: a target subscribes its plugins and returns, and only then connects."""
        program = Programs.why_late(w, waited)
        if program is not None:
            return program
        if w.state is S.SPAWNING and w.alive:
            return (f"{w.name}: its target {w.spec.target} has not returned after "
                    f"{waited:.1f}s: a target subscribes its plugins and returns; run blocking "
                    "work in a plugin or a thread it starts")
        return w.describe()

    def cancel_restarts(self) -> None:
        for w in self.fleet.slots():
            w.cancel_restart()

    # -- events from the process thread ---------------------------------------------------

    def on_lines(self, child: Child, stream: str, lines: list[str]) -> None:
        """A chunk of a worker's output: on 'log' as ``name | line``, a chunk at a time."""
        w = child.data.get("worker")
        if w is not None:
            w.last_lines = child.last_lines
        if self.log_output:
            level = 20 if stream == "stdout" else 30
            log_lines = getattr(self.bus, "log_lines", None)
            self.speaking = child  # whose lines these are, before its slot may know its pid
            try:
                if log_lines is not None:
                    log_lines(child.name, lines, level)
                else:  # another bus (cherrypy.engine): a line at a time
                    for line in lines:
                        self.bus.log(f"{child.name} | {line}", level)
            finally:
                self.speaking = None

    def on_adopted(self, pid: int, rc: int) -> None:
        self.log(f"reaped orphaned process {pid} (exit status {rc})", 20)

    def on_exit(self, child: Child) -> None:
        w: WorkerSlot | None = child.data.get("worker")
        if w is None:
            return
        self.programs.exited(child)
        uptime = (child.ended or time.monotonic()) - child.started
        with self.cond:
            w.exit_code = child.returncode
            w.state = S.EXITED
            w.last_lines = child.last_lines
            running, wanted = self.running and not self.fleet.down(w), w.wanted
        level = 20 if (child.returncode == 0 or not running) else 30
        self.log(f"worker {w.name} (pid {child.pid}) exited: {child.describe_exit()} "
                 f"after {uptime:.2f}s", level)
        if not wanted:
            with self.cond:
                group = self.fleet.groups.get(w.wn.group)  # None: removed by `apply`
                if group is not None:
                    group.discard(w)
        elif running and w.replacing:  # recycle.replace: at once, not a crash (no restart)
            self._spawn(w)
        elif running and (w.spec.restart == "permanent"
                          or (w.spec.restart == "transient" and child.returncode != 0)):
            self._schedule_restart(w, child, uptime)
        self.changed(w)

    def _schedule_restart(self, w: WorkerSlot, child: Child, uptime: float) -> None:
        delay = self.policy.decide(w.name, uptime, w.wn.group,
                                   w.spec.intensity(self.policy.intensity))
        if isinstance(delay, GiveUp):
            tail = w.tail()
            why = (f"{delay}; last: worker {w.name} {child.describe_exit()}"
                   + (f": {tail}" if tail else ""))
            if w.spec.on_fatal == "stop-fleet" or self.bus.state is self.bus.states.STARTING:
                self.fatal_error(why)  # a fleet that cannot start fails as a whole
            else:
                self.on_group_fatal(w.wn.group, why)  # GroupOps.fatal
            return
        with self.cond:
            w.restarts += 1
            w.state = S.BACKOFF
        if delay:
            self.log(f"restarting {w.name} in {delay:.2f}s", 20)
        w.pending = self.procs.call_later(delay, lambda: self._restart(w))

    def _restart(self, w: WorkerSlot) -> None:
        with self.cond:
            if not self.running:
                return
        self._spawn(w)

    def fatal_error(self, msg: str) -> None:
        """Stop the fleet: the bus exits (from its own thread) and start() raises."""
        with self.cond:
            if self.fatal:
                return
            self.fatal = msg
            self.failed = True
            self.running = False
            starting = self.bus.state is self.bus.states.STARTING
            self.cond.notify_all()
        if not starting:  # while starting, start() raises it to its caller, who reports it
            self.log(msg, 40)
            # not from this (process) thread: exit() waits for the process thread's events.
            # Non-daemon, so the main thread's block() waits until the exit is complete (files
            # removed, "Bus EXITED"); said explicitly, since a thread started by a daemon
            # thread (ours, the bridge's) would be a daemon too.
            threading.Thread(target=self._exit_bus, name="fleet-failure-exit",
                             daemon=False).start()

    def _exit_bus(self) -> None:
        try:
            self.bus.exit()
        except Exception:  # noqa: BLE001 - already logged by the bus
            pass

    # -- events from the hub bridge -------------------------------------------------------

    def peer_joined(self, name: str, pid: int | None = None, *args: Any) -> None:
        with self.cond:
            self._joined.add(name)
            w = self.fleet.peer_joined(name, pid)
            if w is None:
                self._note_early(name, pid, None)
        if w is not None:
            self.changed(w)

    def peer_state(self, name: str, state: str, *args: Any) -> None:
        with self.cond:
            w = self.fleet.peer_state(name, state)
            if w is None and name in self._early:
                self._note_early(name, self._early[name][0], state)
        if w is not None:
            self.changed(w)

    def _note_early(self, name: str, pid: int | None, state: Any) -> None:
        """Keep what process ``pid`` of ``name`` reported before it is recorded as that
        worker's (a forked worker can join before its spawn returns): at most one entry
        per worker of the fleet."""
        w = self.fleet.get(name)
        if w is not None and w.wanted and pid is not None and pid != w.pid:
            self._early[name] = (pid, state_name(state))

    def peer_log(self, name: str, msg: str = "", level: int = 20, *args: Any) -> None:
        """Keep a worker's error records: they explain a failed start."""
        if level < 40:
            return
        with self.cond:
            w = self.fleet.get(name)
            if w is not None and w.child is not None:
                lines = w.child.last_lines
                lines.extend(str(msg).splitlines()[-3:])
                del lines[:-20]
                w.last_lines = lines

    def peer_failed(self, name: str, state: str | None = None, error: str = "",
                    *args: Any) -> None:
        """A command failed in worker ``name``: a failed start fails the start at once."""
        if state != "STARTED":
            return
        with self.cond:
            w = self.fleet.current(name, joined=True)
            if w is not None:
                w.start_error = error or "its start failed"
                for touched in self._watches:
                    touched.add(w)
                self.cond.notify_all()

    def peer_lost(self, name: str, reason: str = "", *args: Any) -> None:
        self._terminate(name, f"lost contact with worker {name}", reason)

    def peer_slow(self, name: str, reason: str = "", *args: Any) -> None:
        """The hub's 'peer.slow': worker ``name`` does not read its mirrored channels
        (``reason``; '' once it reads again). Flag it in the table; its group's
        ``slow_peer = "restart"`` terminates it (then restarted as its restart mode says)."""
        with self.cond:
            w = self.fleet.current(name, joined=True)
            if w is None or w.stuck == (reason or None):
                return
            w.stuck = reason or None
        self.changed()
        if reason and w.spec.slow_peer == "restart":
            self._terminate(name, f"worker {name} is stuck", reason)

    def _terminate(self, name: str, what: str, reason: str) -> None:
        """SIGTERM worker ``name`` (SIGKILL after ``term_timeout``), saying why."""
        with self.cond:
            w = self.fleet.current(name, joined=True)
            running = self.running
        if w is None or not running or w.child is None or not w.wanted or w.replacing:
            return  # not running, scaled away or being replaced: asked to leave (and timed)
        child = w.child
        self.log(f"{what} (pid {child.pid}): {reason}; terminating it", 30)
        signal_group(child.pgid, 15)
        self.procs.call_later(
            self.term_timeout,
            lambda: child.returncode is None and signal_group(child.pgid, 9),
        )
