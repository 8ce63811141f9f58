"""Supervisor: a plugin on the parent bus that runs a fleet of worker processes.

The parent's start/stop/graceful/exit reach every worker bus through a hub Bridge and are
acknowledged there; this module composes what the Bridge does not know about, processes:

- 'start' spawns missing workers (``python -m multibus.worker``, exec'd from the long-lived
  :class:`~multibus.procs.ProcessManager` thread, or forked by a preloaded
  :mod:`multibus.zygote` and re-parented to us) and returns once every worker reports
  STARTED, or raises :class:`FleetError` with the worker's own error text.
- 'stop' waits for every worker bus to be STOPPED, 'exit' for every process to exit, each within
  its spec's ``stop_timeout``; then SIGTERM to the worker's process group, then SIGKILL. A
  second Ctrl-C while waiting escalates to SIGKILL at once.
- Dead workers are noticed at once (pidfd) and restarted per their restart mode, as the
  :class:`~multibus.restart.RestartPolicy` says (backoff; too many restarts stop the fleet
  with a clear error instead of a crash loop). Groups scale at run time.
- The state table (:mod:`multibus.fleet`) is published on 'workers' at every change.
  ``exit_code`` is 0 after a clean stop, 1 if anything had to be killed or the fleet failed.

The supervisor is made a child subreaper so orphaned grandchildren are reaped too, and holds
a PID file (``<runtime dir>/<name>.pid``) so a second supervisor of the same name is refused.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from multibus import fdbudget
from multibus import sockets as listening
from multibus.child import Child, stop_children
from multibus.containment import Containment
from multibus.fleet import Fleet, Group, WorkerSlot, WorkerState
from multibus.groupops import GroupOps
from multibus.keeper import FleetError, HubBridge, Keeper
from multibus.procs import ProcessManager, set_child_subreaper
from multibus.recycle import Recycler
from multibus.recycle import replace as _replace
from multibus.reload import Reloader
from multibus.restart import RestartPolicy
from multibus.spawner import Spawner
from multibus.specs import Intensity, SocketSpec, SpecError, WorkerSpec, coerce_specs

__all__ = ["FleetError", "HubBridge", "Supervisor", "WorkerSpec", "Intensity", "SpecError"]

DEFAULT_INTENSITY = Intensity()
S = WorkerState
STOP_DONE = frozenset({S.STOPPED, S.EXITED})
EXIT_DONE = frozenset({S.STOPPED, S.EXITING, S.EXITED})


class Supervisor:
    """Run ``specs`` as worker processes attached to ``bus``.

    ``name`` names the hub (ipc endpoints and PID file); ``pidfile`` overrides the PID file
    path (False: none). ``intensity`` and ``backoff`` (first delay after a quick second
    failure, maximum) make the :class:`~multibus.restart.RestartPolicy`.
    ``bridge_factory(bus, **kw)`` builds the :class:`HubBridge`. ``heartbeat``/``peer_timeout``
    go to the hub and every worker bridge: a dead worker is noticed at once anyway (pidfd);
    heartbeats (default None: none, so an idle fleet costs no wake-ups) only find hung ones.
    By default (``zygote=True``) workers are forked from one preloaded
    ``python -m multibus.zygote`` instead of exec'ing an interpreter for each: a large fleet
    starts several times faster, with the semantics of an exec (see :mod:`multibus.zygote`).
    ``zygote=False`` (``zygote = false``, ``multibus run --exec``) execs every worker. The
    zygote also imports the modules in ``zygote_preload`` (typically the workers' own module),
    once: opt-in, like gunicorn's ``preload_app``, since their import-time code then runs in
    the zygote. Workers it cannot serve (see :func:`~multibus.zygote.exec_reason`), or all
    of them once it is gone, are exec'd; each worker's ``launch`` in the status says which.
    ``containment`` ('auto', 'cgroup', 'scan', 'none', or an open
    :class:`~multibus.containment.Containment` to take over) is the boundary every worker and
    descendant is kept in, killed whole when the supervisor dies (its guardian) or exits.
    """

    def __init__(
        self,
        bus: Any,
        specs: Iterable[WorkerSpec | Mapping[str, Any]],
        *,
        name: str = "multibus",
        endpoints: Any = None,
        pidfile: str | os.PathLike[str] | bool | None = None,
        intensity: Intensity | tuple[int, float] = DEFAULT_INTENSITY,
        backoff: tuple[float, float] = (0.1, 5.0),
        term_timeout: float = 2.0,
        python: str = sys.executable,
        subreaper: bool = True,
        bridge_factory: Callable[..., HubBridge] | None = None,
        log_output: bool = True,
        heartbeat: float | None = None,
        peer_timeout: float = 20.0,
        zygote: bool = True,
        zygote_preload: Iterable[str] = (),
        containment: str | Containment = "auto",
        config: str | None = None,
        sockets: Iterable[SocketSpec] = (),
    ) -> None:
        self.bus = bus
        self.name = name
        self.specs = {s.name: s for s in coerce_specs(specs)}
        self.intensity = intensity if isinstance(intensity, Intensity) else Intensity(*intensity)
        self.backoff = backoff
        self.restart_policy = RestartPolicy(self.intensity, backoff)
        self.term_timeout = term_timeout
        self.python = python
        self.subreaper = subreaper
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        # forked workers are re-parented to us: the zygote needs the subreaper
        self.zygote_requested = bool(zygote)
        self.use_zygote = bool(zygote) and subreaper
        self.zygote_preload = tuple(zygote_preload)
        self.config = config  # the fleet file it runs (absolute), for `multibus apply`
        self.hub_channels: list[str] = []  # what the hub mirrors (fixed once bound)
        self.spawner: Spawner | None = None
        self._endpoints_arg = endpoints
        self._pidfile_arg = pidfile
        self._bridge_factory = bridge_factory
        self.bridge: HubBridge = None  # type: ignore[assignment]  # set by subscribe()
        self.pidfile: Any = None
        self.procs: ProcessManager | None = None
        self.fleet = Fleet(self.specs.values())
        self.keeper = Keeper(bus, name, self.fleet, self.restart_policy, log=self.log,
                             log_output=log_output, term_timeout=term_timeout)
        self._cond = self.keeper.cond  # guards the fleet; notified at every change
        self.groupops = GroupOps(self)  # one group or worker at a time, 'after' order
        self.keeper.on_group_fatal = self.groupops.fatal
        self.killed: set[str] = set()  # workers that had to be signalled
        # (worker, why) for each kill, in order: what a 'stop' op reports (append-only)
        self.kills: list[tuple[str, str]] = []
        self._subscribed: list[tuple[str, Callable[..., Any]]] = []
        self._exit_sent = False  # the stop that opened the exit already told workers to exit
        self.recycler = Recycler(self)  # max_memory / max_age (a thread only if a group sets one)
        self._containment_arg = containment
        self.containment: Containment | None = None  # while subscribed
        # [sockets.NAME]: bound in subscribe(), before any worker; closed after the last exits
        self.socket_specs = {s.name: s for s in sockets}
        for spec in self.specs.values():
            for sname in spec.sockets:
                if sname not in self.socket_specs:
                    raise SpecError(f"worker spec {spec.name!r}: no socket {sname!r}; "
                                    f"sockets: {', '.join(self.socket_specs) or 'none'}")
        self.listening: dict[str, Any] = {}
        self.reloader = Reloader(self)  # rolling reloads (multibus reload)

    @property
    def workers(self) -> Fleet:
        """Worker name -> :class:`~multibus.fleet.WorkerSlot` (a live view)."""
        return self.fleet

    # -- plugin plumbing ------------------------------------------------------------------

    def subscribe(self) -> Supervisor:
        """Take the PID file, become subreaper, start the process thread, bind the hub."""
        if self.procs is not None:
            return self
        fdbudget.raise_soft_limit()  # as systemd and nginx do; then refuse what cannot fit
        fdbudget.check_workers(sum(s.count for s in self.specs.values()), "this fleet")
        if self._pidfile_arg is not False:
            from multibus.plugins.pidfile import PIDFile

            path = self._pidfile_arg
            if path is None or path is True:
                from multibus.rundir import pid_path

                path = pid_path(self.name)
            self.pidfile = PIDFile(self.bus, path)
            self.pidfile.start()  # refuse a second supervisor before binding anything
            self.pidfile.subscribe()
        try:
            self.listening = listening.bind_all(self.socket_specs.values())
            for sname, sock in self.listening.items():
                self.log(f"socket {sname} listening on {listening.bound_address(sock)}")
            if self.subreaper:
                set_child_subreaper()
            arg = self._containment_arg
            self.containment = (Containment.open(arg, self.name) if isinstance(arg, str)
                                else arg)  # before anything is spawned: all of it is inside
            self.procs = ProcessManager(
                on_lines=self.keeper.on_lines, on_exit=self.keeper.on_exit,
                on_adopted=self.keeper.on_adopted,
            )
            self.procs.foreign.add(self.containment.guardian_pid or 0)  # not an orphan of ours
            self.procs.start()
            self.spawner = Spawner(self.procs, self.python, heartbeat=self.heartbeat,
                                   peer_timeout=self.peer_timeout, log=self.log,
                                   fleet=self.name)
            if self.zygote_requested and not self.use_zygote:
                self.spawner.exec_why = "zygote needs subreaper=True"
            self.bridge = self._make_bridge()
            self.spawner.expect = self.bridge.expect  # each worker proves a secret in its hello
            self.spawner.share = self.bridge.share_with  # for workers run as another user
            self.spawner.sockets = self.listening
            self.keeper.attach(self.spawner, self.bridge)
            if self.use_zygote:
                self.spawner.start_zygote(self.specs.values(), self.zygote_preload)
            self.recycler.start()
        except BaseException:
            self._teardown()
            raise
        for channel, cb, prio in (
            ("start", self.start, 75),
            ("stop", self.stop, 40),
            ("graceful", self.graceful, 50),
            ("exit", self.exit, 10),
            ("peer.joined", self.keeper.peer_joined, 50),
            ("peer.state", self.keeper.peer_state, 50),
            ("peer.lost", self.keeper.peer_lost, 50),
            ("peer.slow", self.keeper.peer_slow, 50),
            ("peer.failed", self.keeper.peer_failed, 50),
            ("peer.log", self.keeper.peer_log, 50),
        ):
            self.bus.subscribe(channel, cb, prio)
            self._subscribed.append((channel, cb))
        return self

    def unsubscribe(self) -> None:
        for channel, cb in self._subscribed:
            self.bus.unsubscribe(channel, cb)
        self._subscribed = []

    def _make_bridge(self) -> HubBridge:
        channels = sorted({ch for s in self.specs.values() for ch in s.channels})
        self.hub_channels = channels
        factory = self._bridge_factory
        if factory is None:
            from multibus.transport.bridge import Bridge

            factory = Bridge
        bridge = factory(
            self.bus, role="hub", name=self.name, endpoints=self._endpoints_arg,
            channels=channels, heartbeat=self.heartbeat, peer_timeout=self.peer_timeout,
        )
        bridge.subscribe()
        return bridge

    def _close_zygote(self) -> None:
        """Once nothing more will be spawned; workers spawned after this are exec'd."""
        if self.spawner is not None:
            self.spawner.close_zygote()

    def _teardown(self) -> None:
        self.recycler.close()
        self._close_zygote()
        self._release_containment()
        if self.procs is not None:
            self.procs.close()
        listening.close_all(self.listening.values())
        if self.pidfile is not None:
            self.pidfile.exit()
            self.pidfile.unsubscribe()

    def log(self, msg: str, level: int = 20) -> None:
        self.bus.log(f"Supervisor {self.name}: {msg}", level)

    # -- state table ----------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        """One row per worker: name, group, pid, state, restarts, exit_code, uptime."""
        return self.keeper.table()

    @property
    def exit_code(self) -> int:
        """0 after a clean stop; 1 if a worker had to be killed or the fleet failed."""
        fatal = any(g.fatal is not None for g in self.fleet.groups.values())
        return 1 if (self.killed or self.failed or self.keeper.fatal or fatal) else 0

    @property
    def failed(self) -> bool:
        """The fleet failed to start or had to be stopped."""
        return self.keeper.failed

    # -- spawning -------------------------------------------------------------------------




    # -- bus channels ---------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the fleet and wait until every worker bus is STARTED."""
        k = self.keeper
        with self._cond:
            k.fatal = None
            k.failed = False
            k.running = True
            self.restart_policy.reset()
            for w in self.fleet.slots():
                w.start_error = None
            for g in self.fleet.groups.values():
                g.fatal = None if not g.held else g.fatal  # a start starts every group not held
        t0 = time.monotonic()
        n = sum(1 for w in self.fleet.slots() if w.wanted and not self.fleet.down(w))
        try:
            self.groupops.start_fleet(t0)  # in 'after' order
        except FleetError:
            k.failed = True
            raise
        self.log(f"{n} worker{'s' if n != 1 else ''} STARTED in {time.monotonic() - t0:.3f}s")

    def graceful(self) -> None:
        self.groupops.graceful_fleet()

    def kill_all(self) -> None:
        """SIGKILL every live worker's process group and record it as killed. Safe in a
        signal handler (a second Ctrl-C): it logs nothing and takes no lock. The stop or
        exit under way then only waits for them (no SIGTERM, no more messages)."""
        for w in self.fleet.slots():
            c = w.child
            if c is not None and c.returncode is None and c.signalled != "SIGKILL":
                c.kill()
                self.killed.add(c.name)
                self.kills.append((c.name, "interrupted again: SIGKILL"))

    def stop(self) -> None:
        """Stop every worker bus (processes stay); escalate on those that do not stop in time."""
        with self._cond:
            self.keeper.running = False
            self.keeper.cancel_restarts()
        # When this stop opens the bus's exit, workers exit at once: one round instead of
        # 'stop' then 'exit' (a worker's exit() stops its bus first, so its stop listeners
        # still run before we go on; a stopped worker passes STOPPED or goes to EXITING).
        done, action = STOP_DONE, "stop"
        if getattr(self.bus, "exiting", False):
            done, action = EXIT_DONE, "exit"
            self._exit_sent = True
            if self.containment is not None:
                self.containment.leave_early()
        if self.groupops.stop_waves() is None:  # no 'after': all at once
            self.tell(action)
            if action == "exit":
                self._close_zygote()  # nothing more to spawn: its exit overlaps the workers'
            self.stop_slots(None, done)
            return
        if action == "exit":
            self._close_zygote()
        self.groupops.stop_fleet(action, done)

    def tell(self, action: str, slots: Iterable[WorkerSlot] | None = None) -> None:
        """Send lifecycle ``action`` (start, stop, graceful, exit) to ``slots``; None: every
        worker, and the default for workers that join later. Bus workers get the bus command;
        cmd programs, which have no bus, get a signal instead (stop and exit: their
        ``stop_signal``; graceful: their ``graceful_signal``; start: none, they are spawned)."""
        programs = self.keeper.programs
        if slots is None:
            self.bridge.command(action)
            slots = self.fleet.live()
        else:
            slots = list(slots)
            buses, _ = programs.split(slots)
            if buses:
                self.bridge.command(action, peers=[w.name for w in buses])
        if action == "graceful":
            programs.graceful(slots)
        elif action in ("stop", "exit"):
            programs.stop(slots)

    def stop_slots(self, slots: list[WorkerSlot] | None,
                   done: frozenset[WorkerState] = STOP_DONE) -> bool:
        """Wait until ``slots`` (None: every live worker) are in a ``done`` state, escalating
        on those late; False when interrupted (every live worker was killed at once)."""
        hurry = False
        try:
            self._wait_stopped(done, slots)
        except KeyboardInterrupt:
            hurry = True
        if hurry:
            self._escalate(self.fleet.live(), hurry=True)
            return False
        every = self.fleet.live() if slots is None else [w for w in slots if w.alive]
        late = [w for w in every if w.state not in done]
        if late:
            self._escalate(late, hurry=False)
        return True

    def _wait_stopped(self, done: frozenset[WorkerState],
                      among: list[WorkerSlot] | None = None) -> None:
        """Until every live worker is in a ``done`` state or past its stop_timeout (counted
        from when it is first seen here). O(1) per change: only the workers it touched are
        looked at again (:meth:`Keeper.watch`); every live one on 'anything changed'."""
        deadline: dict[WorkerSlot, float] = {}
        waiting: set[WorkerSlot] = set()
        only = None if among is None else set(among)
        check = float("-inf")  # when deadlines must be looked at again (all of them)
        with self._cond, self.keeper.watch() as watch:
            while True:
                now = time.monotonic()
                touched = self.keeper.touched(watch)
                if None in touched or now >= check:  # re-read: a spawn may have been in flight
                    touched = set(self.fleet.live() if only is None else only) | waiting
                    check = float("inf")
                for w in touched:
                    if w is None or (only is not None and w not in only):
                        continue
                    limit = deadline.setdefault(w, now + w.spec.stop_timeout)
                    if w.alive and w.state not in done and limit > now:
                        waiting.add(w)
                        check = min(check, limit)
                    else:
                        waiting.discard(w)
                if not waiting:
                    return
                self._cond.wait(max(0.0, check - now))

    def exit(self) -> None:
        """Have every worker exit; escalate; reap everything (orphans too); close."""
        self._exit()

    def _exit(self) -> None:
        with self._cond:
            self.keeper.running = False
            self.keeper.cancel_restarts()
        if (self.groupops.stop_waves() is not None and self.bridge is not None
                and not self._exit_sent):
            self._close_zygote()
            self.groupops.exit_fleet()  # reverse 'after' order, each wave gone before the next
        elif self.bridge is not None and not self._exit_sent:
            try:
                self.bridge.command("exit")
            except Exception as e:  # noqa: BLE001 - still escalate below
                self.log(f"cannot send 'exit' to workers: {e}", 30)
        self.recycler.close()
        self._close_zygote()
        self.exit_slots(self.fleet.live(), peers=False)
        self._release_containment()  # what the workers left behind: killed, each logged
        if self.procs is not None:
            self.procs.close()
        listening.close_all(self.listening.values())  # the last worker is gone
        self.keeper.changed()
        if self.killed:  # a failure was logged when it happened: only the kills are news
            n = len(self.killed)
            self.log(f"fleet stopped with errors: {n} worker{'s' if n != 1 else ''} had to be "
                     f"killed ({', '.join(sorted(self.killed))})", 30)
        self.unsubscribe()

    def exit_slots(self, live: list[WorkerSlot], peers: bool) -> None:
        """``live`` exit (told so if ``peers``) within their stop_timeout, or are killed."""
        if peers and live:
            try:
                self.tell("exit", live)
            except Exception as e:  # noqa: BLE001 - still escalate below
                self.log(f"cannot send 'exit' to workers: {e}", 30)
        elif live:
            self.keeper.programs.stop(live)  # they have no bus: stop_signal
        now = time.monotonic()
        deadlines = {w.child: now + w.spec.stop_timeout
                     for w in live if w.child}
        self._mark_killed(stop_children(list(deadlines), deadlines,
                                        term_timeout=self.term_timeout, log=self.log),
                          "did not exit")

    # -- helpers --------------------------------------------------------------------------


    def _release_containment(self) -> None:
        c, self.containment = self.containment, None
        if c is not None:
            c.release(self.log)

    def _escalate(self, workers: list[WorkerSlot], hurry: bool) -> None:
        """Signal ``workers`` that are late (SIGTERM, then SIGKILL) or, in a ``hurry`` (a
        second Ctrl-C), SIGKILL them all at once and wait for them."""
        children = [w.child for w in workers if w.child is not None]
        if hurry:
            self.kill_all()
        self._mark_killed(stop_children(children, time.monotonic(),
                                        term_timeout=self.term_timeout, log=self.log),
                          "did not stop")

    def _mark_killed(self, children: Iterable[Child], what: str) -> None:
        """Record ``children`` as killed: ``what`` they did not do in their stop_timeout."""
        with self._cond:
            for c in children:
                self.killed.add(c.name)
                w = c.data.get("worker")
                limit = f" within {w.spec.stop_timeout:g}s" if w is not None else " in time"
                self.kills.append((c.name, f"{what}{limit}: {c.signalled}"))

    # -- events from the process thread ---------------------------------------------------








    # -- events from the bridge -----------------------------------------------------------





    # -- run-time changes -----------------------------------------------------------------

    def replace(self, name: str, pid: int | None = None, reason: str = "max_age") -> str:
        """Gracefully replace worker ``name`` (its process ``pid``, if given) for ``reason``
        (see :func:`multibus.recycle.replace`); a transition: run it on the main thread."""
        return _replace(self, name, pid, reason)

    def pid_of(self, name: str) -> int | None:
        """The pid of worker ``name``'s process (None: no such worker or process); while its
        output is being logged, of the process that wrote it (its slot may not know it yet)."""
        child = self.keeper.speaking
        if child is not None and child.name == name:
            return child.pid
        w = self.fleet.get(name)
        return None if w is None else w.pid

    def group_status(self, group: str) -> dict[str, Any]:
        """What ``status --json`` adds to a group's entry at run time: its ``state``,
        ``error`` (why FATAL) and ``after``; ``replaced`` (by reason) where it sets
        max_memory or max_age; its code ``generation``, ``new`` and ``old`` once reloaded."""
        out = self.groupops.group_row(group)
        spec = self.specs[group]
        if spec.max_memory or spec.max_age:
            out["replaced"] = dict(self.recycler.replaced.get(group, {}))
        out.update(self.reloader.generation(group))
        return out

    def scale(self, group: str, count: int, timeout: float | None = None) -> None:
        """Run ``count`` workers of ``group``: spawn new ones or stop the highest-numbered.

        With a running fleet, new workers are started and (unless ``timeout`` is 0) waited
        for; removed workers get an 'exit' command, then the usual escalation.
        """
        if group not in self.specs:
            raise SpecError(f"no worker group {group!r}; groups: {', '.join(self.specs)}")
        if not isinstance(count, int) or count < 0:
            raise SpecError(f"scale {group!r}: count {count!r} must be an integer >= 0")
        g: Group = self.fleet.groups[group]
        with self._cond:
            before = len(g.wanted())
            removed, added = g.resize(count)
            running = self.keeper.running
        self.log(f"scaling {group} from {before} to {count}")
        self.remove(removed)
        if added and running:
            t0 = time.monotonic()
            self.keeper.spawn_missing()
            if timeout != 0:
                limit = None if timeout is None else time.monotonic() + timeout
                self.keeper.wait_started(added, t0, limit)
        self.keeper.changed()

    def remove(self, removed: list[WorkerSlot]) -> None:
        """Have workers that leave the fleet (scaled away, replaced) exit, escalating as
        :meth:`exit_slots` does; then forget them at the hub and in the restart policy."""
        self.exit_slots([w for w in removed if w.alive], peers=True)
        for w in removed:
            self.bridge.forget(w.name)
            self.restart_policy.forget(w.name)
