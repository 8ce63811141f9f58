"""run_fleet: run a supervised fleet in the foreground until it exits; return the exit status.

The one start/block/exit sequence behind ``multibus run``, ``examples/fleet.py`` and the test
harness: a Bus, a Supervisor on it, a Control socket (so ``multibus status`` and friends find
it by name), signal handling, log printing and systemd notification.

Signals (see :class:`~multibus.plugins.signals.SignalHandler`): SIGINT/SIGTERM stop the fleet
gracefully, then exit; while it is starting they abort the start at once; a second Ctrl-C
while it exits kills every worker (``Supervisor.kill_all``). SIGHUP, as CherryPy's: on a
terminal (it closed) like SIGTERM; detached (daemon, service, stdin not a tty) a reload.
SIGHUP's reload and SIGTTIN/SIGTTOU (scale the first group) are queued on the Control socket
like the matching commands. SIGUSR1 reopens the log files (:mod:`multibus.logfiles`), for
logrotate.
Exit status: 0 after a clean stop, 1 if a worker had to be killed or the fleet failed.

Containment (:mod:`multibus.containment`) is set up first, while the process has one thread:
its guardian is forked then, and this process moves into the fleet's boundary before it starts
anything.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from multibus.bus import Bus
from multibus.commands import EXIT_FAIL, EXIT_OK, EXIT_USAGE
from multibus.config import FleetConfig
from multibus.containment import Containment, ContainmentError
from multibus.control import Control, ControlError
from multibus.logfiles import LogFileError, LogFiles
from multibus.logprinter import LogPrinter, fleet_sources
from multibus.logview import SUPERVISOR, split_source
from multibus.plugins.pidfile import PIDFileError
from multibus.plugins.signals import SignalHandler
from multibus.rundir import HubNameInUse
from multibus.specs import WorkerSpec, coerce_specs
from multibus.supervisor import FleetError, Supervisor
from multibus.systemd import sd_notify

__all__ = ["FleetRefused", "run_fleet"]


class FleetRefused(RuntimeError):
    """Nothing was started (name in use, unsafe runtime dir, control socket); ``code`` is the
    exit status to return (2: usage, 1: failure)."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code


class _StartedLines:
    """Each worker's own "Bus STARTED" line, so the supervisor's comes after them.

    A worker reports its state and sends its log lines on two sockets, so the supervisor may
    see every worker STARTED (and say "Bus STARTED") before their "Bus STARTED" lines arrive.
    Its 'start' listener (after the Supervisor's) waits, at most ``timeout`` seconds, until it
    has heard each STARTED worker say so; ``heard`` notes the lines, as a 'log' listener only
    while a start is under way (a flood of worker output later costs it nothing)."""

    def __init__(self, bus: Bus, sup: Supervisor, timeout: float = 0.5) -> None:
        self.bus = bus
        self.sup = sup
        self.timeout = timeout
        self._cond = threading.Condition()
        self._heard: set[str] = set()

    def begin(self) -> None:
        """A start begins: listen; lines of earlier starts do not count."""
        with self._cond:
            self._heard.clear()
        self.bus.subscribe("log", self.heard, 2)  # after the printer and the Control's ring

    def heard(self, msg: Any = "", level: Any = 20, *args: Any) -> None:
        source, text = split_source(msg) if isinstance(msg, str) else ("", "")
        if text == "Bus STARTED" and source != SUPERVISOR:
            with self._cond:
                self._heard.add(source)
                self._cond.notify_all()

    def wait(self) -> None:
        started = {r["name"] for r in self.sup.table()  # a cmd program has no bus lines
                   if r["state"] == "STARTED" and r.get("launch") != "cmd"}
        with self._cond:
            self._cond.wait_for(lambda: started <= self._heard, self.timeout)
        self.bus.unsubscribe("log", self.heard)


def _refusal(name: str, error: Exception, pidfile: Any) -> str:
    """The one line saying why supervisor ``name`` could not start. A name in use (its
    default PID file, or its hub lock) is fixed with ``--name``; an explicit PID file's own
    message says which path to change."""
    by_name = isinstance(error, HubNameInUse) or (
        isinstance(error, PIDFileError) and pidfile in (None, True))
    if not by_name:
        return f"cannot start supervisor {name!r}: {error}"
    pid = getattr(error, "pid", None)
    # no live pid to name: say what was found (which file, what it held), not just "in use"
    who = f"pid {pid}" if pid else f"another process ({error})"
    return (f"cannot start supervisor {name!r}: that name is in use by {who}; run this one "
            f"with --name OTHER, or stop that one first (multibus exit --name {name})")


def run_fleet(
    fleet: FleetConfig | Iterable[WorkerSpec | Mapping[str, Any]],
    *,
    name: str | None = None,
    bus: Bus | None = None,
    log: Callable[..., Any] | None = None,
    on_started: Callable[[Supervisor], Any] | None = None,
    on_failed: Callable[[FleetError], Any] | None = None,
    **supervisor_options: Any,
) -> int:
    """Run ``fleet`` (a FleetConfig, or worker specs) until its bus exits; return 0 or 1.

    ``bus``: a Bus with the caller's own listeners (default: a new one). ``log``: the 'log'
    listener (default: a :class:`LogPrinter` on stderr at the config's level and format).
    ``on_started(supervisor)`` runs once the first start is over; ``on_failed(error)`` replaces
    the default log line when the fleet fails. ``supervisor_options`` override the config's
    Supervisor arguments. Raises :class:`FleetRefused` when nothing could be started.
    """
    cfg = fleet if isinstance(fleet, FleetConfig) else FleetConfig(coerce_specs(fleet))
    cfg = cfg.with_name(name)
    mode = supervisor_options.pop("containment", cfg.containment)
    try:  # first: the guardian is forked before any thread of ours (the log printer's)
        contain = Containment.open(mode, cfg.name) if isinstance(mode, str) else mode
    except ContainmentError as e:
        raise FleetRefused(f"cannot start supervisor {cfg.name!r}: {e}", EXIT_USAGE) from e
    notify_env = {"NOTIFY_SOCKET": os.environ.pop("NOTIFY_SOCKET", "")}  # not for workers
    bus = Bus() if bus is None else bus
    printer = None
    if log is None:
        sources = fleet_sources({spec.name: spec.count for spec in cfg.specs})
        log = printer = LogPrinter(cfg.log_level, cfg.log_format, sys.stderr,
                                   sources=sources).start()
    bus.subscribe("log", log, 1)
    try:
        files = _log_files(cfg, log)
    except LogFileError as e:
        if printer is not None:
            printer.close()
        raise FleetRefused(f"{cfg.source}: {e}" if cfg.source else str(e), EXIT_USAGE) from e
    if files is not None:
        bus.subscribe("log", files, 1)
    options: dict[str, Any] = {
        "pidfile": cfg.pidfile, "intensity": cfg.intensity, "term_timeout": cfg.term_timeout,
        "zygote": cfg.zygote, "zygote_preload": cfg.zygote_preload, "config": cfg.path,
        "sockets": cfg.sockets, **supervisor_options}
    try:
        sup = Supervisor(bus, cfg.specs, name=cfg.name, containment=contain, **options)
    except BaseException:
        contain.release()
        raise
    try:
        sup.subscribe()
    except Exception as e:  # noqa: BLE001 - name in use (names the pid), unsafe runtime dir...
        for closing in (printer, files):
            if closing is not None:
                closing.close()
        if sup.containment is None:  # refused before it took the containment over
            contain.release()
        raise FleetRefused(_refusal(cfg.name, e, options["pidfile"]), EXIT_USAGE) from e

    stopping = threading.Event()

    def notify(state: str) -> None:
        sd_notify(state, notify_env)

    control: Control | None = None

    def shutdown() -> None:
        """Cancel the queued control ops, stop the fleet gracefully, then exit (a second ^C
        meanwhile: see SignalHandler)."""
        if not stopping.is_set():
            stopping.set()
            notify("STOPPING=1")
        if control is not None:
            control.cancel_waiting()
        bus.exit()

    try:
        control = Control(bus, sup, name=cfg.name, exit_func=shutdown,
                          interrupt_start=lambda: os.kill(os.getpid(), signal.SIGTERM)).subscribe()
    except Exception as e:  # noqa: BLE001
        bus.exit()
        for closing in (printer, files):
            if closing is not None:
                closing.close()
        raise FleetRefused(str(e), EXIT_FAIL) from e
    try:  # several hosts (multibus.downstream / multibus.upstream)
        if cfg.downstream is not None:
            from multibus.downstream import Downstream

            control.hosts = Downstream(bus, cfg.downstream, cfg.name).subscribe()
        if cfg.upstream is not None:
            from multibus.upstream import Upstream

            Upstream(bus, control, cfg.upstream, cfg.upstream.host or cfg.name).subscribe()
    except Exception as e:  # noqa: BLE001 - the port is taken, a bad address...
        bus.exit()
        for closing in (printer, files):
            if closing is not None:
                closing.close()
        raise FleetRefused(f"cannot start supervisor {cfg.name!r}: {e}", EXIT_FAIL) from e
    if files is not None:
        files.pid_of = sup.pid_of
    # max_memory / max_age replacements are ops, serialized with the user's commands
    sup.recycler.request = lambda worker, pid, reason: control.queue(
        "replace", worker=worker, pid=pid, reason=reason)

    def workers_started() -> None:
        n = sum(1 for r in sup.table() if r["state"] == "STARTED")
        notify(f"READY=1\nSTATUS={n} workers STARTED")

    lines = _StartedLines(bus, sup)
    bus.subscribe("start", lines.begin, 0)
    bus.subscribe("start", lines.wait, 99)  # after the Supervisor's (75)
    bus.subscribe("start", workers_started, 100)
    bus.subscribe("stop", lambda: notify("STATUS=fleet STOPPED"), 100)
    bus.subscribe("exit", lambda: stopping.is_set() or notify("STOPPING=1"), 0)

    default = cfg.default_group
    detached = SignalHandler.is_detached()
    # a closed terminal (SIGHUP when attached) stops the fleet as Ctrl-C does, start included
    handler = SignalHandler(bus, interrupt_again=sup.kill_all, abort_start=(
        "SIGTERM", "SIGINT", *(() if detached else ("SIGHUP",))),
        interrupt_op=sup.reloader.interrupt_soon)

    def hangup() -> None:
        """SIGHUP, as CherryPy's SignalHandler: detached (daemon, service), a reload; on a
        terminal, the terminal closed: stop the fleet and exit."""
        if detached:
            bus.log("SIGHUP without a terminal: graceful reload")
            queue("graceful")
        else:
            bus.log("SIGHUP on a terminal (it closed): stopping the fleet")
            shutdown()

    def queue(action: str, **args: Any) -> None:
        """Queue what a signal asks for, as the matching command would (a full queue: said)."""
        try:
            control.queue(action, **args)
        except ControlError as e:
            bus.log(f"{action} not queued: {e}", 30)

    handler.handlers = {
        "SIGTERM": shutdown,
        "SIGINT": shutdown,
        "SIGHUP": hangup,
        "SIGTTIN": lambda: queue("scale", group=default, delta=1),
        "SIGTTOU": lambda: queue("scale", group=default, delta=-1),
        "SIGUSR1": lambda: _reopen(bus, files),
        "SIGUSR2": lambda: queue("reload", groups=[]),  # rolling reload of every group
    }
    handler.subscribe()
    code = EXIT_OK
    try:
        try:
            bus.start()
            if on_started is not None:
                on_started(sup)
            bus.block()
        except FleetError as e:
            if on_failed is not None:
                on_failed(e)
            else:
                bus.log(f"fleet {cfg.name!r} failed: {e}", 40)
            code = EXIT_FAIL
        except KeyboardInterrupt:  # interrupted while starting: start() has exited the bus
            bus.log(f"fleet {cfg.name!r}: start aborted by a stop request")
    finally:
        try:
            shutdown()
        except KeyboardInterrupt:
            shutdown()  # interrupted again while exiting: workers are killed at once
        try:
            handler.unsubscribe()
        except Exception:  # noqa: BLE001
            pass
        if files is not None:
            files.close()
        if printer is not None:
            printer.close()
    return max(code, sup.exit_code)


def _log_files(cfg: FleetConfig, log: Callable[..., Any]) -> LogFiles | None:
    """The fleet's log files, open and writing (None without any); LogFileError when one
    cannot be opened. A file that fails later is said once on ``log`` (the terminal)."""
    if cfg.log_file is None and not cfg.group_log_files:
        return None
    return LogFiles(cfg.log_level, cfg.log_format, cfg.log_file, cfg.group_log_files,
                    counts={spec.name: spec.count for spec in cfg.specs},
                    on_error=lambda text: log(text, 40)).start()


def _reopen(bus: Bus, files: LogFiles | None) -> None:
    """SIGUSR1 (logrotate's postrotate): reopen the log files by their paths."""
    if files is None:
        bus.log("SIGUSR1: no log files to reopen")
        return
    files.reopen()
    bus.log(f"log files reopened ({', '.join(f.path for f in files.files)})")
