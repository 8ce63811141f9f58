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
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from multibus.fleet import Fleet, WorkerSlot, WorkerState
from multibus.procs import Child, ProcessManager, signal_group
from multibus.restart import GiveUp, RestartPolicy
from multibus.spawner import Spawner

__all__ = ["FleetError", "HubBridge", "Keeper"]

S = WorkerState


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
        self.term_timeout = term_timeout
        self.cond = threading.Condition(threading.RLock())
        self.running = False  # spawns and restarts allowed (between start and stop)
        self.fatal: str | None = None  # why the fleet had to be stopped
        self.failed = False
        self.spawner: Spawner | None = None
        self.bridge: HubBridge = None  # type: ignore[assignment]

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

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()
            if not self.bus.listeners.get("workers"):
                return  # nobody listens: a 50-row table per change is a fleet stop's main cost
            rows = self.table()
        try:
            self.bus.publish("workers", rows)
        except Exception:  # noqa: BLE001 - a bad 'workers' listener must not break us
            pass

    def _spawn(self, w: WorkerSlot) -> None:
        """Spawn ``w`` (manager thread only)."""
        assert self.spawner is not None and self.procs.in_thread()
        w.pending = None
        if not w.wanted or self.fleet.get(w.name) is not w or not self.running or w.alive:
            return
        self.bridge.forget(w.name)
        try:
            child = self.spawner.spawn(w.name, w.spec, self.bridge.endpoints.to_string())
        except OSError as e:
            msg = f"cannot spawn worker {w.name}: {e}"
            self.log(msg, 40)
            w.last_lines = [msg]
            w.exit_code = 127
            with self.cond:
                w.state = S.EXITED
            self.fatal_error(msg)
            return
        child.data["worker"] = w
        with self.cond:
            w.child, w.pid, w.since, w.state = child, child.pid, child.started, S.SPAWNING
            w.start_error = w.stuck = None
            w.launch = child.data.get("launch")
        # A forked worker can join (and report STARTED) before we get here: the bridge events
        # for it were dropped as unknown, so take its state from the bridge (read outside our
        # lock; an event applied meanwhile is newer and wins).
        info = self.bridge.peers().get(w.name)
        if info and info.get("pid") == child.pid and info.get("joined"):
            joined = WorkerState.of_bus(info.get("state")) or S.JOINED
            with self.cond:
                if w.child is child and w.state is S.SPAWNING:
                    w.state = joined
        self.changed()

    def spawn_missing(self) -> None:
        """Spawn every wanted worker that has no live process (from any thread)."""
        done = threading.Event()

        def run() -> None:
            try:
                for w in self.fleet.slots():
                    if w.wanted and not w.alive:
                        w.cancel_restart()
                        self._spawn(w)
            finally:
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
        ``limit`` (a monotonic time) if given."""
        with self.cond:
            while True:
                if self.fatal:
                    raise FleetError(self.fatal)
                waiting = [w for w in (self.fleet.slots() if slots is None else slots)
                           if w.wanted and w.state is not S.STARTED]
                if not waiting:
                    return
                failed = [w for w in waiting if w.start_error is not None]
                if failed:
                    w = failed[0]
                    raise FleetError(f"fleet {self.name!r}: worker {w.name} failed to start: "
                                     f"{w.start_error}")
                now = time.monotonic()
                deadline = {w.name: self._deadline(w, t0) if limit is None else limit
                            for w in waiting}
                late = [w for w in waiting if now >= deadline[w.name]]
                if late:
                    more = f" (and {len(late) - 5} more)" if len(late) > 5 else ""
                    waited = now - max(t0, late[0].since or t0)
                    raise FleetError(
                        f"fleet {self.name!r}: {len(late)} worker(s) not STARTED after "
                        f"{waited:.1f}s (start_timeout): "
                        + "; ".join(self._why_late(w, now - max(t0, w.since or t0))
                                    for w in late[:5]) + more)
                self.cond.wait(min(deadline.values()) - now)

    @staticmethod
    def _why_late(w: WorkerSlot, waited: float) -> str:
        """What keeps ``w`` from STARTED. A live worker that has not joined is still in its
        target: a target subscribes its plugins and returns, and only then connects."""
        if w.state is S.SPAWNING and w.alive:
            return (f"{w.name}: its target {w.spec.target} has not returned after "
                    f"{waited:.1f}s: a target subscribes its plugins and returns; run blocking "
                    "work in a plugin or a thread it starts")
        return w.describe()

    def cancel_restarts(self) -> None:
        for w in self.fleet.slots():
            w.cancel_restart()

    # -- events from the process thread ---------------------------------------------------

    def on_line(self, child: Child, stream: str, line: str) -> None:
        w = child.data.get("worker")
        if w is not None:
            w.last_lines = child.last_lines
        if self.log_output:
            self.bus.log(f"{child.name} | {line}", 20 if stream == "stdout" else 30)

    def on_adopted(self, pid: int, rc: int) -> None:
        self.log(f"reaped orphaned process {pid} (exit status {rc})", 20)

    def on_exit(self, child: Child) -> None:
        w: WorkerSlot | None = child.data.get("worker")
        if w is None:
            return
        uptime = (child.ended or time.monotonic()) - child.started
        with self.cond:
            w.exit_code = child.returncode
            w.state = S.EXITED
            w.last_lines = child.last_lines
            running, wanted = self.running, w.wanted
        level = 20 if (child.returncode == 0 or not running) else 30
        self.log(f"worker {w.name} (pid {child.pid}) exited: {child.describe_exit()} "
                 f"after {uptime:.2f}s", level)
        if not wanted:
            with self.cond:
                self.fleet.group_of(w).discard(w)
        elif running and (w.spec.restart == "permanent"
                          or (w.spec.restart == "transient" and child.returncode != 0)):
            self._schedule_restart(w, child, uptime)
        self.changed()

    def _schedule_restart(self, w: WorkerSlot, child: Child, uptime: float) -> None:
        delay = self.policy.decide(w.name, uptime)
        if isinstance(delay, GiveUp):
            tail = w.tail()
            self.fatal_error(f"{delay}; last: worker {w.name} {child.describe_exit()}"
                             + (f": {tail}" if tail else ""))
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
            changed = self.fleet.peer_joined(name, pid)
        if changed:
            self.changed()

    def peer_state(self, name: str, state: str, *args: Any) -> None:
        with self.cond:
            changed = self.fleet.peer_state(name, state)
        if changed:
            self.changed()

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
        if w is None or not running or w.child is None or not w.wanted:
            return  # not running, or scaled away: it was asked to leave (scale times it)
        child = w.child
        self.log(f"{what} (pid {child.pid}): {reason}; terminating it", 30)
        signal_group(child.pgid, 15)
        self.procs.call_later(
            self.term_timeout,
            lambda: child.returncode is None and signal_group(child.pgid, 9),
        )
