"""Supervisor: a plugin on the parent bus that owns a fleet of worker processes.

The parent's start/stop/graceful/exit reach every worker bus through a hub Bridge and are
acknowledged there; this module adds what the Bridge does not know about — processes:

- 'start' spawns missing workers (``python -m multibus.worker``, exec'd from the long-lived
  :class:`~multibus.procs.ProcessManager` thread, or forked by a preloaded
  :mod:`multibus.zygote` and re-parented to us) and returns once every worker reports
  STARTED, or raises :class:`FleetError` with the worker's own error text.
- 'stop' waits for every worker bus to be STOPPED, 'exit' for every process to exit, each within
  its spec's ``stop_timeout``; then SIGTERM to the worker's process group, then SIGKILL. A
  second Ctrl-C while waiting escalates to SIGKILL at once.
- Dead workers are noticed at once (pidfd) and restarted per their restart mode with
  exponential backoff; too many restarts in a period (:class:`~multibus.specs.Intensity`)
  stops the fleet with a clear error instead of a crash loop. Groups scale at run time.
- A state table (name, pid, state, restarts, exit code, uptime) is published on 'workers'
  at every change. ``exit_code`` is 0 after a clean stop, 1 if anything had to be killed or
  the fleet failed.

The supervisor is made a child subreaper so orphaned grandchildren are reaped too, and holds
a PID file (``<runtime dir>/<name>.pid``) so a second supervisor of the same name is refused.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multibus.procs import Child, ProcessManager, set_child_subreaper, signal_group, stop_children
from multibus.specs import Intensity, SpecError, WorkerSpec, coerce_specs

__all__ = ["FleetError", "Supervisor", "WorkerSpec", "Intensity", "SpecError"]

DEFAULT_INTENSITY = Intensity()
EXITED = "EXITED"
SPAWNING = "SPAWNING"
BACKOFF = "BACKOFF"


class FleetError(RuntimeError):
    """The fleet could not start, or had to be stopped (restart intensity reached)."""


@dataclass(eq=False)
class _Worker:
    name: str
    spec: WorkerSpec
    child: Child | None = None
    state: str = EXITED
    restarts: int = 0
    exit_code: int | None = None
    pid: int | None = None
    since: float | None = None
    wanted: bool = True
    quick_failures: int = 0
    pending: list[bool] | None = None  # cancel token of a scheduled restart
    last_lines: list[str] = field(default_factory=list)

    def row(self, now: float) -> dict[str, Any]:
        alive = self.child is not None and self.child.returncode is None
        return {
            "name": self.name,
            "group": self.spec.name,
            "pid": self.pid if alive else None,
            "state": self.state,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "uptime": round(now - self.since, 3) if alive and self.since is not None else 0.0,
        }


class Supervisor:
    """Run ``specs`` as worker processes attached to ``bus``.

    ``name`` names the hub (ipc endpoints and PID file); ``pidfile`` overrides the PID file
    path (False: none). ``backoff`` is (first delay after a quick second failure, maximum);
    the first restart is immediate. ``bridge_factory(bus, **kw)`` builds the hub Bridge
    (tests may replace it). ``heartbeat``/``peer_timeout`` go to the hub and every worker
    bridge: a dead worker is noticed at once anyway (pidfd), heartbeats only find hung ones,
    and each wakes the supervisor up; the default ``None`` sends none (an idle fleet then
    costs the supervisor no wake-ups). Give a number of seconds to detect hung workers.
    ``zygote=True`` forks workers from one preloaded ``python -m multibus.zygote`` instead of
    exec'ing an interpreter for each: a large fleet starts several times faster. It also
    imports the modules in ``zygote_preload`` (typically the workers' own module, found on
    their cwd and PYTHONPATH), once, in the supervisor's environment: opt-in, like gunicorn's
    ``preload_app``, since their import-time code then runs in the zygote, not in each worker.
    Workers it cannot serve (spec env setting PYTHON* other than PYTHONPATH, or LD_*), or all
    of them once it is gone, are exec'd as usual.
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
        bridge_factory: Callable[..., Any] | None = None,
        log_output: bool = True,
        heartbeat: float | None = None,
        peer_timeout: float = 20.0,
        zygote: bool = False,
        zygote_preload: Iterable[str] = (),
    ) -> None:
        self.bus = bus
        self.name = name
        self.specs = {s.name: s for s in coerce_specs(specs)}
        self.intensity = intensity if isinstance(intensity, Intensity) else Intensity(*intensity)
        self.backoff = backoff
        self.term_timeout = term_timeout
        self.python = python
        self.subreaper = subreaper
        self.log_output = log_output
        # Worker death is seen at once through its pidfd (and the control socket's
        # disconnect); heartbeats only catch a hung worker, and each one wakes the
        # supervisor up: off by default.
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        # Fork workers from a preloaded zygote (multibus.zygote) instead of exec'ing each
        # one: needs the subreaper (forked workers are re-parented to us).
        self.use_zygote = bool(zygote) and subreaper
        self.zygote_preload = tuple(zygote_preload)
        self.zygote: Any = None
        self._endpoints_arg = endpoints
        self._pidfile_arg = pidfile
        self._bridge_factory = bridge_factory
        self.bridge: Any = None
        self.pidfile: Any = None
        self.procs: ProcessManager | None = None
        self.workers: dict[str, _Worker] = {}
        self._cond = threading.Condition(threading.RLock())
        self._running = False  # restarts allowed (between start and stop)
        self._fatal: str | None = None
        self._restart_times: collections.deque[float] = collections.deque()
        self.killed: set[str] = set()  # workers that had to be signalled
        self.failed = False
        self._subscribed: list[tuple[str, Callable[..., Any]]] = []
        self._exit_sent = False  # the stop that opened the exit already told workers to exit
        for spec in self.specs.values():
            for n in spec.instance_names():
                self.workers[n] = _Worker(n, spec)

    # -- plugin plumbing ------------------------------------------------------------------

    def subscribe(self) -> Supervisor:
        """Take the PID file, become subreaper, start the process thread, bind the hub."""
        if self.procs is not None:
            return self
        if self._pidfile_arg is not False:
            from multibus.plugins.pidfile import PIDFile

            path = self._pidfile_arg
            if path is None or path is True:
                from multibus.transport.endpoints import runtime_dir

                path = runtime_dir() / f"{self.name}.pid"
            self.pidfile = PIDFile(self.bus, path)
            self.pidfile.start()  # refuse a second supervisor before binding anything
            self.pidfile.subscribe()
        try:
            if self.subreaper:
                set_child_subreaper()
            self.procs = ProcessManager(
                on_line=self._on_line, on_exit=self._on_exit, on_adopted=self._on_adopted
            ).start()
            self.bridge = self._make_bridge()
            if self.use_zygote:
                self.procs.call_soon(self._start_zygote)
        except BaseException:
            self._teardown()
            raise
        for channel, cb, prio in (
            ("start", self.start, 75),
            ("stop", self.stop, 40),
            ("graceful", self.graceful, 50),
            ("exit", self.exit, 10),
            ("peer.joined", self._peer_joined, 50),
            ("peer.state", self._peer_state, 50),
            ("peer.lost", self._peer_lost, 50),
            ("peer.log", self._peer_log, 50),
        ):
            self.bus.subscribe(channel, cb, prio)
            self._subscribed.append((channel, cb))
        return self

    def unsubscribe(self) -> None:
        for channel, cb in self._subscribed:
            self.bus.unsubscribe(channel, cb)
        self._subscribed = []

    def _make_bridge(self) -> Any:
        channels = sorted({ch for s in self.specs.values() for ch in s.channels})
        factory = self._bridge_factory
        if factory is None:
            from multibus.transport.bridge import Bridge as factory  # noqa: N813
        bridge = factory(
            self.bus, role="hub", name=self.name, endpoints=self._endpoints_arg,
            channels=channels, heartbeat=self.heartbeat, peer_timeout=self.peer_timeout,
        )
        bridge.subscribe()
        return bridge

    def _start_zygote(self) -> None:
        """Exec the zygote (manager thread): it preloads while the bus starts."""
        from multibus.zygote import ZygoteClient

        paths: list[str] = []  # where preloads are found: the workers' cwd, then PYTHONPATH
        for spec in self.specs.values() if self.zygote_preload else ():
            env = self._env(spec)
            for p in [spec.cwd or os.getcwd(), *env["PYTHONPATH"].split(os.pathsep)]:
                if p and p not in paths:
                    paths.append(p)
        z = ZygoteClient(self.procs, self.python, self._env(None), self.zygote_preload,
                         log=lambda msg, level: self.log(msg, level), paths=tuple(paths))
        try:
            z.start()
        except OSError as e:
            self.log(f"cannot start the zygote ({e}); exec'ing workers instead", 30)
            return
        self.zygote = z

    def _close_zygote(self) -> None:
        """Once nothing more will be spawned; workers spawned after this are exec'd."""
        z, self.zygote = self.zygote, None
        if z is None or self.procs is None or not self.procs.thread.is_alive():
            return
        done = threading.Event()

        def shut() -> None:
            z.shutdown()
            done.set()

        self.procs.call_soon(shut)
        done.wait(5.0)
        z.close(wait=1.0)

    def _teardown(self) -> None:
        self._close_zygote()
        if self.procs is not None:
            self.procs.close()
        if self.pidfile is not None:
            self.pidfile.exit()
            self.pidfile.unsubscribe()

    def log(self, msg: str, level: int = 20) -> None:
        self.bus.log(f"Supervisor {self.name}: {msg}", level)

    # -- state table ----------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        """One row per worker: name, group, pid, state, restarts, exit_code, uptime."""
        now = time.monotonic()
        with self._cond:
            return [w.row(now) for w in self.workers.values()]

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
            if not self.bus.listeners.get("workers"):
                return  # nobody listens: a 50-row table per change is a fleet stop's main cost
            rows = self.table()
        try:
            self.bus.publish("workers", rows)
        except Exception:  # noqa: BLE001 - a bad 'workers' listener must not break us
            pass

    @property
    def exit_code(self) -> int:
        """0 after a clean stop; 1 if a worker had to be killed or the fleet failed."""
        return 1 if (self.killed or self.failed or self._fatal) else 0

    # -- spawning -------------------------------------------------------------------------

    def _argv(self, w: _Worker) -> list[str]:
        return [self.python, "-m", "multibus.worker", *self._worker_args(w)]

    def _worker_args(self, w: _Worker) -> list[str]:
        argv = [
            "--parent-pid", str(os.getpid()),
            "--name", w.name,
            "--target", w.spec.target,
            "--stop-timeout", repr(float(w.spec.stop_timeout)),
            "--endpoints", self.bridge.endpoints.to_string(),
            "--heartbeat", "none" if self.heartbeat is None else repr(float(self.heartbeat)),
            "--peer-timeout", repr(float(self.peer_timeout)),
        ]
        for ch in w.spec.channels:
            argv += ["--channel", ch]
        return argv

    def _env(self, spec: WorkerSpec | None) -> dict[str, str]:
        env = dict(os.environ)
        if spec is not None:
            env.update(spec.env)
        # the worker must import multibus as we do, whatever its cwd
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if here not in paths:
            paths.append(here)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, w: _Worker) -> None:
        """Spawn ``w`` (manager thread only)."""
        assert self.procs is not None and self.procs.in_thread()
        w.pending = None
        if not w.wanted or w.name not in self.workers or not self._running:
            return
        if w.child is not None and w.child.returncode is None:
            return
        if self.bridge is not None and hasattr(self.bridge, "forget"):
            try:
                self.bridge.forget(w.name)
            except Exception:  # noqa: BLE001
                pass
        try:
            env = self._env(w.spec)
            child = None
            if self.zygote is not None:
                child = self.zygote.spawn(w.name, self._worker_args(w), env, w.spec.cwd)
            if child is None:
                child = self.procs.spawn(w.name, self._argv(w), env, w.spec.cwd)
        except OSError as e:
            msg = f"cannot spawn worker {w.name}: {e}"
            self.log(msg, 40)
            w.last_lines = [msg]
            w.exit_code = 127
            with self._cond:
                w.state = EXITED
            self._fatal_error(msg)
            return
        child.data["worker"] = w
        with self._cond:
            w.child = child
            w.pid = child.pid
            w.since = child.started
            w.state = SPAWNING
        # A forked worker can join (and report STARTED) before we get here: the bridge events
        # for it were dropped as unknown, so take its state from the bridge (read outside our
        # lock; an event applied meanwhile is newer and wins).
        joined = self._joined_state(w.name, child.pid)
        if joined:
            with self._cond:
                if w.child is child and w.state == SPAWNING:
                    w.state = joined
        self._changed()

    def _joined_state(self, name: str, pid: int) -> str | None:
        peers = getattr(self.bridge, "peers", None)
        if peers is None:
            return None
        try:
            info = peers().get(name)
        except Exception:  # noqa: BLE001 - a test double without it
            return None
        if not info or info.get("pid") != pid or not info.get("joined"):
            return None
        return str(info.get("state") or "JOINED")

    def _spawn_missing(self) -> None:
        """Spawn every wanted worker that has no live process (from any thread)."""
        assert self.procs is not None
        done = threading.Event()

        def run() -> None:
            try:
                for w in list(self.workers.values()):
                    if w.wanted and (w.child is None or w.child.returncode is not None):
                        if w.pending is not None:
                            w.pending[0] = True
                        self._spawn(w)
            finally:
                done.set()

        self.procs.call_soon(run)
        while not done.wait(0.5):
            if not self.procs.thread.is_alive():
                raise FleetError("the process thread died")

    # -- bus channels ---------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the fleet and wait until every worker bus is STARTED."""
        with self._cond:
            self._fatal = None
            self.failed = False
            self._running = True
            self._restart_times.clear()
        self.bridge.command("start")
        t0 = time.monotonic()
        self._spawn_missing()
        wanted = [w for w in self.workers.values() if w.wanted]
        deadline = {w.name: t0 + w.spec.start_timeout for w in wanted}
        with self._cond:
            while True:
                if self._fatal:
                    self.failed = True
                    raise FleetError(self._fatal)
                waiting = [w for w in self.workers.values()
                           if w.wanted and w.state != "STARTED"]
                if not waiting:
                    break
                now = time.monotonic()
                late = [w for w in waiting if now >= deadline.get(w.name, now + 1)]
                if late:
                    self.failed = True
                    raise FleetError(self._late_message(late, now - t0))
                self._cond.wait(min(deadline.get(w.name, now + 1) for w in waiting) - now)
        n = len(wanted)
        self.log(f"{n} worker{'s' if n != 1 else ''} STARTED in {time.monotonic() - t0:.3f}s")

    def _late_message(self, late: list[_Worker], elapsed: float) -> str:
        parts = []
        for w in late[:5]:
            tail = " / ".join(line for line in w.last_lines[-3:] if line.strip())
            parts.append(
                f"{w.name} is {w.state}"
                + (f" (last {w.child.describe_exit()})" if w.child and w.child.returncode
                   is not None else "")
                + (f": {tail}" if tail else "")
            )
        more = f" (and {len(late) - 5} more)" if len(late) > 5 else ""
        return (f"fleet {self.name!r}: {len(late)} worker(s) not STARTED after {elapsed:.1f}s "
                f"(start_timeout): " + "; ".join(parts) + more)

    def graceful(self) -> None:
        self.bridge.command("graceful")

    def kill_all(self) -> None:
        """SIGKILL every live worker's process group now (a second Ctrl-C): no waiting and
        no logging, so a signal handler may call it; the reaper then sees them exit."""
        for w in list(self.workers.values()):
            c = w.child
            if c is not None and c.returncode is None:
                signal_group(c.pgid, 9)
                self.killed.add(c.name)

    def stop(self) -> None:
        """Stop every worker bus (processes stay); escalate on those that do not stop in time."""
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._running = False
            self._cancel_pending()
        # When this stop opens the bus's exit, workers exit at once: one round instead of
        # 'stop' then 'exit' (a worker's exit() stops its bus first, so its stop listeners
        # still run before we go on; a stopped worker passes STOPPED or goes to EXITING).
        done = ("STOPPED", "EXITING", EXITED)
        if getattr(self.bus, "exiting", False):
            self._exit_sent = True
            self.bridge.command("exit")
            self._close_zygote()  # nothing more to spawn: its exit overlaps the workers'
        else:
            done = ("STOPPED", EXITED)
            self.bridge.command("stop")
        deadline: dict[str, float] = {}
        hurry = False
        try:
            with self._cond:
                while True:
                    now = time.monotonic()
                    waiting = []
                    for w in self._live():  # re-read: a spawn may have been in flight
                        limit = deadline.setdefault(w.name, now + w.spec.stop_timeout)
                        if w.state not in done and limit > now:
                            waiting.append(w)
                    if not waiting:
                        break
                    self._cond.wait(min(deadline[w.name] for w in waiting) - now)
        except KeyboardInterrupt:
            hurry = True
        if hurry:
            self._escalate(self._live(), hurry=True)
            return
        late = [w for w in self._live() if w.state not in done]
        if late:
            self._escalate(late, hurry=False)

    def exit(self) -> None:
        """Have every worker exit; escalate; reap everything (orphans too); close."""
        self._exit()

    def _exit(self) -> None:
        with self._cond:
            self._running = False
            self._cancel_pending()
        if self.bridge is not None and not self._exit_sent:
            try:
                self.bridge.command("exit")
            except Exception as e:  # noqa: BLE001 - still escalate below
                self.log(f"cannot send 'exit' to workers: {e}", 30)
        live = self._live()
        now = time.monotonic()
        self._close_zygote()
        deadlines = {w.child: now + w.spec.stop_timeout
                     for w in live if w.child}
        signalled = stop_children(
            list(deadlines), deadlines, term_timeout=self.term_timeout, log=self._log_level
        )
        self._mark_killed(signalled)
        if self.procs is not None:
            self.procs.close()
        self._changed()
        if self.exit_code:
            why = self._fatal or ("killed: " + ", ".join(sorted(self.killed)))
            self.log(f"fleet stopped with errors ({why})", 30)
        self.unsubscribe()

    # -- helpers --------------------------------------------------------------------------

    def _log_level(self, msg: str, level: int) -> None:
        self.log(msg, level)

    def _live(self) -> list[_Worker]:
        with self._cond:
            return [w for w in self.workers.values()
                    if w.child is not None and w.child.returncode is None]

    def _cancel_pending(self) -> None:
        for w in self.workers.values():
            if w.pending is not None:
                w.pending[0] = True
                w.pending = None
                if w.state == BACKOFF:
                    w.state = EXITED

    def _escalate(self, workers: list[_Worker], hurry: bool) -> None:
        children = [w.child for w in workers if w.child is not None]
        if hurry:
            self.kill_all()
        signalled = stop_children(children, time.monotonic(), term_timeout=self.term_timeout,
                                  log=self._log_level)
        if hurry:
            signalled = set(children)
        self._mark_killed(signalled)

    def _mark_killed(self, children: Iterable[Child]) -> None:
        with self._cond:
            for c in children:
                self.killed.add(c.name)

    # -- events from the process thread ---------------------------------------------------

    def _on_line(self, child: Child, stream: str, line: str) -> None:
        w = child.data.get("worker")
        if w is not None:
            w.last_lines = child.last_lines
        if self.log_output:
            self.bus.log(f"{child.name} | {line}", 20 if stream == "stdout" else 30)

    def _on_adopted(self, pid: int, rc: int) -> None:
        self.log(f"reaped orphaned process {pid} (exit status {rc})", 20)

    def _on_exit(self, child: Child) -> None:
        w: _Worker | None = child.data.get("worker")
        if w is None:
            return
        uptime = (child.ended or time.monotonic()) - child.started
        with self._cond:
            w.exit_code = child.returncode
            w.state = EXITED
            w.last_lines = child.last_lines
            running, wanted = self._running, w.wanted
        level = 20 if (child.returncode == 0 or not running) else 30
        self.log(f"worker {w.name} (pid {child.pid}) exited: {child.describe_exit()} "
                 f"after {uptime:.2f}s", level)
        if not wanted:
            with self._cond:
                if self.workers.get(w.name) is w:
                    del self.workers[w.name]
            self._changed()
            return
        if running and self._should_restart(w, child):
            self._schedule_restart(w, uptime)
        self._changed()

    def _should_restart(self, w: _Worker, child: Child) -> bool:
        mode = w.spec.restart
        return mode == "permanent" or (mode == "transient" and child.returncode != 0)

    def _schedule_restart(self, w: _Worker, uptime: float) -> None:
        now = time.monotonic()
        period, most = self.intensity.period, self.intensity.max_restarts
        times = self._restart_times
        while times and now - times[0] > period:
            times.popleft()
        if len(times) >= most:
            tail = " / ".join(line for line in w.last_lines[-3:] if line.strip())
            assert w.child is not None
            self._fatal_error(
                f"restart intensity reached: {len(times) + 1} restarts within {period:g}s "
                f"(max {most}); last: worker {w.name} {w.child.describe_exit()}"
                + (f": {tail}" if tail else "")
            )
            return
        times.append(now)
        w.quick_failures = 0 if uptime >= period else w.quick_failures + 1
        first, cap = self.backoff
        delay = 0.0 if w.quick_failures <= 1 else min(cap, first * 2 ** (w.quick_failures - 2))
        with self._cond:
            w.restarts += 1
            w.state = BACKOFF
        if delay:
            self.log(f"restarting {w.name} in {delay:.2f}s", 20)
        assert self.procs is not None
        w.pending = self.procs.call_later(delay, lambda: self._restart(w))

    def _restart(self, w: _Worker) -> None:
        with self._cond:
            if not self._running:
                return
        self._spawn(w)

    def _fatal_error(self, msg: str) -> None:
        """Stop the fleet: the bus exits (from its own thread) and start() raises."""
        with self._cond:
            if self._fatal:
                return
            self._fatal = msg
            self.failed = True
            self._running = False
            starting = self.bus.state is self.bus.states.STARTING
            self._cond.notify_all()
        self.log(msg, 40)
        if not starting:
            # not from this (process) thread: exit() waits for the process thread's events.
            # Non-daemon, so the main thread's block() waits until the exit is complete.
            threading.Thread(target=self._exit_bus, name="fleet-failure-exit").start()

    def _exit_bus(self) -> None:
        try:
            self.bus.exit()
        except Exception:  # noqa: BLE001 - already logged by the bus
            pass

    # -- events from the bridge -----------------------------------------------------------

    def _current(self, name: str, pid: int | None = None) -> _Worker | None:
        w = self.workers.get(name)
        if w is None or w.child is None or w.child.returncode is not None:
            return None
        if pid is not None and pid != w.child.pid:
            return None  # a stale report from a previous process of that name
        return w

    def _peer_joined(self, name: str, pid: int | None = None, *args: Any) -> None:
        with self._cond:
            w = self._current(name, pid)
            if w is None or w.state != SPAWNING:
                return
            w.state = "JOINED"
        self._changed()

    def _current_joined(self, name: str) -> _Worker | None:
        """The live worker ``name`` if its process has joined: 'peer.state' and 'peer.lost'
        carry no pid, and until the current process joins (its 'peer.joined' names its
        pid) such a report can only be about a previous process of that name."""
        w = self._current(name)
        return None if w is None or w.state == SPAWNING else w

    def _peer_state(self, name: str, state: str, *args: Any) -> None:
        with self._cond:
            w = self._current_joined(name)
            if w is None:
                return
            w.state = str(state)
        self._changed()

    def _peer_log(self, name: str, msg: str = "", level: int = 20, *args: Any) -> None:
        """Keep a worker's error records: they explain a failed start."""
        if level < 40:
            return
        with self._cond:
            w = self.workers.get(name)
            if w is not None and w.child is not None:
                lines = w.child.last_lines
                lines.extend(str(msg).splitlines()[-3:])
                del lines[:-20]
                w.last_lines = lines

    def _peer_lost(self, name: str, reason: str = "", *args: Any) -> None:
        with self._cond:
            w = self._current_joined(name)
            running = self._running
        if w is None or not running or w.child is None:
            return
        child = w.child
        self.log(f"lost contact with worker {name} (pid {child.pid}): {reason}; terminating it",
                 30)
        signal_group(child.pgid, 15)
        assert self.procs is not None
        self.procs.call_later(
            self.term_timeout,
            lambda: child.returncode is None and signal_group(child.pgid, 9),
        )

    # -- run-time changes -----------------------------------------------------------------

    def scale(self, group: str, count: int, timeout: float | None = None) -> None:
        """Run ``count`` workers of ``group``: spawn new ones or stop the highest-numbered.

        With a running fleet, new workers are started and (unless ``timeout`` is 0) waited
        for; removed workers get an 'exit' command, then the usual escalation.
        """
        if group not in self.specs:
            raise SpecError(f"no worker group {group!r}; groups: {', '.join(self.specs)}")
        if not isinstance(count, int) or count < 0:
            raise SpecError(f"scale {group!r}: count {count!r} must be an integer >= 0")
        spec = self.specs[group]
        with self._cond:
            current = sorted(
                (w for w in self.workers.values() if w.spec is spec and w.wanted),
                key=lambda w: int(w.name.rsplit(".", 1)[1]),
            )
            extra = current[count:]
            for w in extra:
                w.wanted = False
                if w.pending is not None:
                    w.pending[0] = True
                    w.pending = None
                if w.child is None or w.child.returncode is not None:
                    del self.workers[w.name]
            used = {int(w.name.rsplit(".", 1)[1]) for w in self.workers.values()
                    if w.spec is spec}
            added = []
            i = 0
            while len(current) - len(extra) + len(added) < count:
                if i not in used:
                    n = f"{group}.{i}"
                    self.workers[n] = _Worker(n, spec)
                    added.append(self.workers[n])
                i += 1
            running = self._running
        self.log(f"scaling {group} from {len(current)} to {count}")
        if extra:
            live = [w for w in extra if w.child is not None and w.child.returncode is None]
            if live:
                self.bridge.command("exit", peers=[w.name for w in live])
                now = time.monotonic()
                children = [w.child for w in live if w.child is not None]
                self._mark_killed(stop_children(
                    children, now + spec.stop_timeout, term_timeout=self.term_timeout,
                    log=self._log_level))
            for w in extra:
                try:
                    self.bridge.forget(w.name)
                except Exception:  # noqa: BLE001
                    pass
        if added and running:
            self._spawn_missing()
            if timeout != 0:
                limit = time.monotonic() + (spec.start_timeout if timeout is None else timeout)
                with self._cond:
                    while any(w.state != "STARTED" for w in added if w.wanted):
                        left = limit - time.monotonic()
                        if left <= 0 or self._fatal:
                            raise FleetError(self._fatal or self._late_message(
                                [w for w in added if w.state != "STARTED"],
                                spec.start_timeout))
                        self._cond.wait(left)
        self._changed()
