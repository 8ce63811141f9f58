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
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

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
from multibus.logprinter import LogPrinter
from multibus.systemd import sd_notify

__all__ = ["LogPrinter", "main", "sd_notify"]

PROG = "multibus"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


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

    from multibus.runner import FleetRefused, run_fleet

    cfg = replace(cfg, log_level=level, log_format=fmt,
                  zygote=cfg.zygote or args.zygote or bool(args.preload),
                  zygote_preload=(*cfg.zygote_preload, *(args.preload or ())))
    try:
        return run_fleet(cfg)
    except FleetRefused as e:
        _err(str(e))
        return e.code


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
