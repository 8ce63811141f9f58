"""The ``multibus`` command: run a supervised fleet, and control it from another terminal.

    multibus run TARGET|FILE.toml [-n N] [--name NAME] [--mirror CH ...]
    multibus status [--json]
    multibus start | stop | restart | graceful | exit
    multibus scale GROUP N
    multibus logs [-f] [GROUP]

``run`` stays in the foreground: a Supervisor on a Bus, a Control socket (``control.py``) so the
other commands can find it by name, signal handling, log printing and systemd notification.
The other commands talk to that socket; transitions are queued there and this client waits for
them (``--no-wait`` to return once queued). Exit status: 0 ok, 1 failure or no such
supervisor, 2 bad usage or configuration (nothing started).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, TextIO

from multibus.config import (
    ConfigError,
    FleetConfig,
    check_targets,
    from_target,
    load,
    parse_level,
    valid_module,
)
from multibus.control import ControlClient, ControlError, NotRunning, resolve_name
from multibus.logview import SUPERVISOR, Record, format_json, format_text, split_source, use_colour

__all__ = ["main", "sd_notify"]

PROG = "multibus"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- systemd

def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's $NOTIFY_SOCKET; False if unset/failed.

    Stdlib only: one AF_UNIX datagram, abstract namespace when the address starts with '@'.
    """
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- log printing

class LogPrinter:
    """The 'log' listener of ``multibus run``: filter by level, format, write.

    Listeners run on the bridge's I/O thread and the process thread too, so the listener never
    blocks on the terminal: records go to a bounded queue that one daemon thread writes out. A
    stalled stderr (a paused pager, a slow journal) drops lines — counted and reported —
    instead of stalling heartbeats or reaping. ``close()`` flushes what is queued.
    """

    def __init__(self, level: int, fmt: str, stream: TextIO, max_queue: int = 10000) -> None:
        self.level = level
        self.fmt = fmt
        self.stream = stream
        self.colour = fmt == "text" and use_colour(stream)
        self.width = 0
        self.dropped = 0
        self._queue: collections.deque[Record] = collections.deque()
        self._max = max_queue
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> LogPrinter:
        self._thread = threading.Thread(target=self._run, name="multibus-log", daemon=True)
        self._thread.start()
        return self

    def __call__(self, msg: Any = "", level: Any = 20, *args: Any, **kw: Any) -> None:
        lvl = level if isinstance(level, int) and not isinstance(level, bool) else 20
        if lvl < self.level:
            return
        source, text = split_source(msg if isinstance(msg, str) else str(msg))
        rec = (0, time.time(), lvl, source, text)
        if self._thread is None:
            self.write(rec)
            return
        with self._cond:
            if len(self._queue) >= self._max:
                self.dropped += 1
                return
            self._queue.append(rec)
            self._cond.notify()

    def _run(self) -> None:
        reported = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                dropped = self.dropped
            if dropped > reported:
                self.write((0, time.time(), 30, SUPERVISOR,
                            f"{dropped - reported} log lines dropped (output too slow)"))
                reported = dropped
            for rec in batch:
                self.write(rec)

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued (bounded by ``timeout``), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def write(self, rec: Record) -> None:
        if self.fmt == "json":
            line = format_json(rec)
        else:
            self.width = max(self.width, min(len(rec[3]), 24))
            line = format_text(rec, self.colour, self.width)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # closed terminal: keep running


# --------------------------------------------------------------------------- run

def _load_fleet(args: argparse.Namespace) -> FleetConfig:
    target = args.target
    if target.endswith(".toml") or os.path.isfile(target):
        if args.n is not None or args.mirror:
            raise ConfigError(f"{target}: -n and --mirror apply to a TARGET; set count and "
                              "channels in the file")
        cfg = load(target)
    elif ":" in target:
        cfg = from_target(target, 1 if args.n is None else args.n, args.mirror or ())
    else:
        raise ConfigError(f"{target!r} is neither a .toml file nor a 'package.module:callable' "
                          "target")
    return cfg.with_name(_name(args))


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = _load_fleet(args)
        level = cfg.log_level if args.log_level is None else parse_level(args.log_level)
        fmt = args.log_format or cfg.log_format
        for module in args.preload or ():
            if not valid_module(module):
                raise ConfigError(f"--preload {module!r}: expected a module name like "
                                  "'app.jobs'")
        check_targets(cfg)
    except ConfigError as e:
        _err(str(e))
        return EXIT_USAGE

    from multibus.bus import Bus
    from multibus.control import Control
    from multibus.plugins.signals import SignalHandler
    from multibus.supervisor import FleetError, Supervisor

    notify_env = {"NOTIFY_SOCKET": os.environ.pop("NOTIFY_SOCKET", "")}  # not for workers
    bus = Bus()
    printer = LogPrinter(level, fmt, sys.stderr).start()
    bus.subscribe("log", printer, 1)
    sup = Supervisor(bus, cfg.specs, name=cfg.name, pidfile=cfg.pidfile,
                     intensity=cfg.intensity, term_timeout=cfg.term_timeout,
                     zygote=cfg.zygote or args.zygote or bool(args.preload),
                     zygote_preload=(*cfg.zygote_preload, *(args.preload or ())))
    try:
        sup.subscribe()
    except Exception as e:  # noqa: BLE001 - name in use (names the pid), unsafe runtime dir...
        printer.close()
        _err(f"cannot start supervisor {cfg.name!r}: {e}")
        return EXIT_USAGE

    stopping = threading.Event()

    def notify(state: str) -> None:
        sd_notify(state, notify_env)

    def shutdown() -> None:
        """Stop the fleet gracefully, then exit. A second ^C while stopping kills workers."""
        if not stopping.is_set():
            stopping.set()
            notify("STOPPING=1")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        bus.exit()

    try:
        control = Control(bus, sup, name=cfg.name, exit_func=shutdown,
                          interrupt_start=lambda: os.kill(os.getpid(), signal.SIGTERM)).subscribe()
    except Exception as e:  # noqa: BLE001
        bus.exit()
        printer.close()
        _err(str(e))
        return EXIT_FAIL

    def workers_started() -> None:
        n = sum(1 for r in sup.table() if r["state"] == "STARTED")
        notify(f"READY=1\nSTATUS={n} workers STARTED")

    bus.subscribe("start", workers_started, 100)
    bus.subscribe("stop", lambda: notify("STATUS=fleet STOPPED"), 100)
    bus.subscribe("exit", lambda: stopping.is_set() or notify("STOPPING=1"), 0)

    default = cfg.default_group
    handler = SignalHandler(bus)
    handler.handlers = {
        "SIGTERM": shutdown,
        "SIGINT": shutdown,
        "SIGHUP": lambda: control.queue("graceful"),
        "SIGTTIN": lambda: control.queue("scale", group=default, delta=1),
        "SIGTTOU": lambda: control.queue("scale", group=default, delta=-1),
    }
    handler.subscribe()
    _abort_start_on(bus, signal.SIGTERM, signal.SIGINT)
    code = EXIT_OK
    try:
        try:
            bus.start()
            bus.block()
        except FleetError as e:
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
        printer.close()
    return max(code, sup.exit_code)


def _abort_start_on(bus: Any, *signals: int) -> None:
    """Make ``signals`` abort a start in progress.

    Transitions run on the main thread; while it is inside ``bus.start()`` (waiting for the
    workers) the SignalHandler's deferred 'exit' would only run once the start is over, up to
    ``start_timeout`` later. So while the bus is STARTING these signals raise KeyboardInterrupt
    there instead: ``Bus.start`` then exits the bus (workers are stopped and reaped) and the
    supervisor exits. In every other state the SignalHandler's own handler runs.
    """
    from multibus.bus import states

    for signum in signals:
        installed = signal.getsignal(signum)
        if not callable(installed):
            continue  # left ignored on purpose (nohup)

        def handle(sig: int, frame: Any, installed: Any = installed) -> None:
            if bus.state is states.STARTING:
                raise KeyboardInterrupt(f"{signal.Signals(sig).name} while starting")
            installed(sig, frame)

        signal.signal(signum, handle)


# --------------------------------------------------------------------------- control commands

def _name(args: argparse.Namespace) -> str | None:
    return getattr(args, "name", None) or getattr(args, "global_name", None)


def _client(args: argparse.Namespace) -> ControlClient:
    name = _name(args)
    if name is None and getattr(args, "config", None):
        name = load(args.config).name
    return ControlClient(resolve_name(name), timeout=args.request_timeout)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def format_status(st: dict[str, Any]) -> str:
    """The human table of ``multibus status``."""
    lines = []
    n = len(st["workers"])
    head = (f"{st['name']} (pid {st['pid']}): {st['state']}, {n} worker{'s' if n != 1 else ''}, "
            f"up {_duration(st['uptime'])}")
    lines.append(head)
    for op in st["queue"]:
        lines.append(f"  {op['state']}: {op['action']}"
                     + (f" {op['args']}" if op["args"] else ""))
    rows = [("GROUP", "WORKER", "PID", "STATE", "RESTARTS", "UPTIME", "CPU%", "MEM")]
    for w in st["workers"]:
        rows.append((
            w["group"], w["name"], str(w["pid"] or "-"),
            w["state"] + (f" ({w['exit_code']})" if w["exit_code"] and not w["pid"] else ""),
            str(w["restarts"]), _duration(w["uptime"] if w["pid"] else None),
            "-" if w["cpu_percent"] is None else f"{w['cpu_percent']:.1f}", _size(w["memory_rss"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    st = _client(args).status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return EXIT_OK


def _wait_gone(pid: int, timeout: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            return True
        time.sleep(0.05)
    return False


def _finish(client: ControlClient, reply: dict[str, Any], what: str,
            args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    label = f"{client.name}: {what}"
    if args.no_wait:
        print(f"{label} queued (op {reply['op']})")
        return EXIT_OK
    if what == "exit":
        if _wait_gone(int(reply["pid"]), args.timeout):
            print(f"{label}: supervisor (pid {reply['pid']}) exited "
                  f"in {time.monotonic() - t0:.2f}s")
            return EXIT_OK
        _err(f"{label}: supervisor (pid {reply['pid']}) still running after {args.timeout:g}s")
        return EXIT_FAIL
    try:
        done = client.wait_op(int(reply["op"]), args.timeout)
    except NotRunning:
        _err(f"{label}: the supervisor exited before it was done")
        return EXIT_FAIL
    if done["state"] == "failed":
        _err(f"{label} failed: {done['error']}")
        return EXIT_FAIL
    note = f" ({done['note']})" if done.get("note") else ""
    print(f"{label} done in {time.monotonic() - t0:.2f}s{note}")
    return EXIT_OK


def cmd_action(args: argparse.Namespace) -> int:
    client = _client(args)
    return _finish(client, client.op(args.command), args.command, args)


def cmd_scale(args: argparse.Namespace) -> int:
    if args.count < 0:
        _err(f"scale {args.group}: count must be >= 0, got {args.count}")
        return EXIT_USAGE
    client = _client(args)
    return _finish(client, client.scale(args.group, args.count),
                   f"scale {args.group} to {args.count}", args)


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    level = parse_level(args.level) if args.level else 0
    fmt = args.log_format or "text"
    printer = LogPrinter(level, fmt, sys.stdout)
    if args.follow:
        records = client.follow(args.group, backlog=args.lines)
    else:
        records = client.logs(0, args.group, max(1, min(args.lines, 1000)))[0] \
            if args.lines else []
    try:
        for rec in records:
            if rec[2] >= level:
                printer.write(rec)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Run a fleet of worker buses under a supervisor, and control it.",
        epilog="Exit status: 0 ok, 1 failure (or no such supervisor), 2 bad usage or "
               "configuration.",
    )
    ap.add_argument("--name", dest="global_name", metavar="NAME", help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", metavar="NAME",
                        help="supervisor name (default: the file's, else 'multibus'; control "
                             "commands: the only running one)")

    ctl = argparse.ArgumentParser(add_help=False, parents=[common])
    ctl.add_argument("-c", "--config", metavar="FILE",
                     help="take the supervisor name from this fleet file")
    ctl.add_argument("--request-timeout", type=float, default=5.0, metavar="S",
                     help=argparse.SUPPRESS)

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--no-wait", action="store_true",
                         help="return once the supervisor has queued it")
    waiting.add_argument("--timeout", type=float, default=120.0, metavar="S",
                         help="seconds to wait for it to be done (default 120)")

    run = sub.add_parser("run", parents=[common], help="run a supervisor in the foreground",
                         description="Run a fleet in the foreground: TARGET is "
                         "'package.module:callable' (called with each worker's bus), or a "
                         "fleet .toml file. Ctrl-C / SIGTERM stop it gracefully; SIGHUP "
                         "reloads; SIGTTIN / SIGTTOU add / remove a worker of the first group.")
    run.add_argument("target", metavar="TARGET|FILE")
    run.add_argument("-n", type=int, default=None, metavar="N",
                     help="number of workers of TARGET (default 1)")
    run.add_argument("--mirror", action="append", metavar="CH",
                     help="mirror bus channel CH between supervisor and workers (repeatable)")
    run.add_argument("--log-level", default=None, metavar="LEVEL",
                     help="debug, info (default), warning, error, critical")
    run.add_argument("--log-format", choices=("text", "json"), default=None,
                     help="text lines (default) or JSON lines")
    run.add_argument("--zygote", action="store_true",
                     help="fork workers from one preloaded process instead of starting an "
                     "interpreter for each (faster; as 'zygote = true' in a fleet file)")
    run.add_argument("--preload", action="append", metavar="MODULE",
                     help="have that process import MODULE once, e.g. your worker module, "
                     "instead of each worker (implies --zygote; repeatable)")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", parents=[ctl], help="show every worker")
    st.add_argument("--json", action="store_true", help="machine-readable (stable keys)")
    st.set_defaults(func=cmd_status)

    helps = {
        "start": "start every worker bus (spawning missing workers)",
        "stop": "stop every worker bus (processes stay; the supervisor stays)",
        "restart": "stop, then start every worker bus",
        "graceful": "reload every worker bus (bus 'graceful')",
        "exit": "stop every worker, then the supervisor exits",
    }
    for action, text in helps.items():
        p = sub.add_parser(action, parents=[ctl, waiting], help=text, description=text)
        p.set_defaults(func=cmd_action)

    sc = sub.add_parser("scale", parents=[ctl, waiting], help="run N workers of GROUP")
    sc.add_argument("group")
    sc.add_argument("count", type=int, metavar="N")
    sc.set_defaults(func=cmd_scale)

    lg = sub.add_parser("logs", parents=[ctl], help="show recent log lines (of GROUP)")
    lg.add_argument("group", nargs="?", metavar="GROUP",
                    help="a group, a worker (group.index) or 'supervisor'")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                    help="how many recent lines (default 100, at most 1000)")
    lg.add_argument("--level", default=None, metavar="LEVEL", help="minimum level")
    lg.add_argument("--log-format", choices=("text", "json"), default=None)
    lg.set_defaults(func=cmd_logs)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multibus`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NotRunning as e:
        _err(str(e))
        return EXIT_FAIL
    except ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    except ControlError as e:
        _err(str(e))
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def console() -> None:
    """The ``multibus`` console script: main(), then leave without interpreter teardown
    (a supervisor that has reaped its fleet has nothing left for it; see ``exit_now``)."""
    from multibus.fastexit import exit_now

    exit_now(main())


if __name__ == "__main__":
    console()
