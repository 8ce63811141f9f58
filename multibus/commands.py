"""Every control command, declared once (as Circus declares one class per command).

A :class:`Command` is the request's ``cmd`` name and argument ``schema`` (control.py's
``decode_request`` checks every request against it), its ``answer`` (run by the Control
socket thread; the reply) and its command line: the subcommands it adds to ``multibus``
(``add_parsers``: help and arguments) and what they print (``run``). The transitions they
queue are :mod:`multibus.actions`; the status table is :mod:`multibus.statustext`. Both
sides read this table: the server (``control.Control``) and the parser
(``cli.build_parser``).

Exit status of the CLI side: 0 ok, 1 failure or no such supervisor, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from multibus import fdbudget
from multibus.actions import (
    ACTIONS,
    TRANSITIONS,
    Action,
    ControlError,
    NotRunning,
    _targets,
    state_of,
)
from multibus.controlclient import MAX_WAIT
from multibus.names import valid_group, valid_host, valid_name
from multibus.statustext import format_status
from multibus.targets import (
    MAX_TARGETS,
    is_host_target,
    is_targets,
    only,
    parse_signal,
    qualified,
    unknown,
)

__all__ = ["ACTIONS", "COMMANDS", "Action", "Command", "ControlError", "NotRunning",
           "TRANSITIONS", "format_status", "say_error", "state_of"]

PROG = "multibus"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
MAX_FOLLOWERS = 64  # requests held at once: 'logs' waiting for records, 'op_status' for an end
LOG_REPLY_BYTES = 1 << 20  # a logs reply stops adding records past this

Check = Callable[[Any], bool]


def say_error(msg: str) -> None:
    """``multibus: msg`` on stderr."""
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


def is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_source(v: Any) -> bool:
    """A log filter: a group, a worker (``group.index``) or 'supervisor'; on a parent of
    hosts a host (a name), ``HOST:GROUP`` or ``HOST:GROUP.N``."""
    return valid_group(v) or valid_name(v) or is_host_target(v)


def is_hosts(v: Any) -> bool:
    """A list of at most MAX_TARGETS host names."""
    return isinstance(v, list) and len(v) <= MAX_TARGETS and all(map(valid_host, v))


U32 = (0, 2**32 - 1)


# --------------------------------------------------------------------------- commands

class Command:
    """One request type: ``name``, ``schema`` (key -> check: these keys, and any of
    ``optional``), ``answer`` (server side) and the CLI side (``add_parsers``, ``run``;
    none by default)."""

    name: ClassVar[str]
    schema: ClassVar[dict[str, Check]] = {}
    optional: ClassVar[dict[str, Check]] = {}  # keys a request may add (newer clients)

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any] | None:
        """The reply (``ok`` and the command's keys), or None when the Control will answer
        later (a waiting 'logs' or 'op_status', see :meth:`later`). Raise ControlError for a
        refusal."""
        raise NotImplementedError

    def later(self, ctl: Any, req: dict[str, Any], final: bool) -> dict[str, Any] | None:
        """For a request the Control holds: its reply once there is something to say, else
        None; ``final`` (its wait is over): the reply as it stands."""
        raise NotImplementedError

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        """Add this command's ``multibus`` subcommands (``ctl``/``waiting``: parent parsers
        with --name/-c and --no-wait/--timeout); each sets ``control=self``."""

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        """Do the subcommand with a client from ``connect()``; return the exit status."""
        raise NotImplementedError


def _queued(ctl: Any, op: Any) -> dict[str, Any]:
    reply = {"ok": True, "op": op.id, "pid": os.getpid(), "state": op.state}
    if op.note:  # e.g. an 'exit' that cancelled the queued ops says how many
        reply["note"] = op.note
    return reply


class Status(Command):
    name = "status"

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": ctl.status()}

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        text = "show every worker: group, pid, state, restarts, uptime, CPU% and memory"
        st = sub.add_parser("status", parents=[ctl], help="show every worker",
                            description=text + "; and the operations queued")
        st.add_argument("--json", action="store_true", help="machine-readable (stable keys)")
        st.add_argument("targets", nargs="*", metavar="TARGET",
                        help="only these groups (job) or workers (job.2)")
        st.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        st = connect().status()
        if args.targets:
            why = unknown(args.targets, [qualified(g, "name") for g in st["groups"]],
                          lambda: {qualified(w, "name") for w in st["workers"]})
            if why:
                say_error(why)
                return EXIT_FAIL
            st = only(st, args.targets)
        if args.json:
            print(json.dumps(st, indent=2, sort_keys=True))
        else:
            print(format_status(st))
        return EXIT_OK


class OpCommand(Command):
    """Queue one of ``ACTIONS`` (on ``targets``, groups or workers; none: every group); an
    'exit' while the fleet is starting interrupts the start."""

    name = "op"
    schema = {"action": lambda v: v in ACTIONS}
    optional = {"targets": is_targets, "hosts": is_hosts}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("hosts"):  # exit HOST: one host's supervisor (a parent of hosts)
            if req["action"] != "exit" or req.get("targets"):
                raise ControlError(f"{req['action']} takes TARGETs (HOST:GROUP), not HOSTs")
            if ctl.hosts is None:
                raise ControlError(f"supervisor {ctl.name!r} takes no hosts (no [downstream] "
                                   f"table); `{PROG} exit` alone exits this supervisor")
            hosts = sorted(set(req["hosts"]))
            ctl.hosts.check_hosts(hosts)
            return _queued(ctl, ctl.queue("exit_host", hosts=hosts))
        if req.get("targets"):
            if req["action"] == "exit":
                raise ControlError("exit takes no TARGET: it stops every group, then the "
                                   "supervisor (stop TARGET stops only those; on a parent "
                                   "of hosts, exit HOST exits that host's supervisor)")
            op = ctl.queue(req["action"], targets=_targets(ctl, req["targets"]))
        else:
            op = ctl.queue(req["action"])
        if op.action == "exit" and ctl.interrupt_start and state_of(ctl.bus) == "STARTING":
            ctl.interrupt_start()
        return _queued(ctl, op)

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        for action in ACTIONS:
            text = TRANSITIONS[action].help
            p = sub.add_parser(action, parents=[ctl, waiting], help=text, description=text)
            if action != "exit":
                p.add_argument("targets", nargs="*", metavar="TARGET",
                               help="a group (job) or a worker (job.2); none: every group")
            else:
                p.add_argument("hosts", nargs="*", metavar="HOST",
                               help="on a parent of hosts: only these hosts' supervisors "
                               "exit; none: this supervisor and every host")
            p.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        client = connect()
        hosts = getattr(args, "hosts", None) or []
        if hosts:
            if "hosts" not in client.status():  # a usage error, as before there were hosts
                say_error(f"exit takes no HOST here: supervisor {client.name!r} takes no hosts "
                          f"(no [downstream] table); `{PROG} exit` alone exits it")
                return EXIT_USAGE
            reply = client.request("op", action="exit", hosts=list(hosts))
            return _finish(client, reply, " ".join(["exit", *hosts]), args)
        targets = getattr(args, "targets", None) or []
        return _finish(client, client.op(args.command, targets),
                       " ".join([args.command, *targets]), args)


class Signal(Command):
    """Queue a signal to the process groups of the workers of ``targets``."""

    name = "signal"
    schema = {"targets": lambda v: is_targets(v) and bool(v),
              "signal": lambda v: is_int(v, 1, 64)}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        targets = _targets(ctl, req["targets"])
        return _queued(ctl, ctl.queue("signal", targets=targets, signal=req["signal"]))

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        text = TRANSITIONS["signal"].help
        sg = sub.add_parser("signal", parents=[ctl, waiting], help=text,
                            description=f"{text} (a group: each of its workers)")
        sg.add_argument("targets", nargs="+", metavar="TARGET",
                        help="a group (job) or a worker (job.2)")
        sg.add_argument("signal", metavar="SIGNAL", help="a name (HUP, SIGHUP) or a number")
        sg.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        try:
            signum = parse_signal(args.signal)
        except ValueError as e:
            say_error(str(e))
            return EXIT_USAGE
        client = connect()
        reply = client.request("signal", targets=list(args.targets), signal=signum)
        return _finish(client, reply, f"signal {' '.join(args.targets)} {args.signal}", args)


class Apply(Command):
    """Queue the re-reading of a fleet file (validated by the CLI first, read again here)."""

    name = "apply"
    schema = {"file": lambda v: isinstance(v, str) and 0 < len(v) <= 4096 and v[0] == "/"}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        return _queued(ctl, ctl.queue("apply", file=req["file"]))

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        text = TRANSITIONS["apply"].help
        ap = sub.add_parser("apply", parents=[ctl, waiting], help=text,
                            description=f"{text}, without stopping the rest. FILE: the file "
                            "`run` was given by default. A bad file changes nothing (exit 2).")
        ap.add_argument("file", nargs="?", metavar="FILE")
        ap.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        from multibus.config import load
        from multibus.preflight import check_targets

        client = connect()
        path = os.path.abspath(args.file) if args.file else client.status().get("config")
        if not path:
            say_error(f"apply: supervisor {client.name!r} was not run from a fleet file; name "
                      "one: multibus apply FILE")
            return EXIT_USAGE
        check_targets(load(path))  # ConfigError: one line, exit 2, nothing changed
        return _finish(client, client.request("apply", file=path), f"apply {path}", args)


class Scale(Command):
    name = "scale"
    schema = {"group": lambda v: valid_group(v) or is_host_target(v),
              "count": lambda v: is_int(v, 0, 10_000)}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        group = req["group"]
        if is_host_target(group):  # HOST:GROUP, on a parent of hosts: that host's to check
            _targets(ctl, [group])
            return _queued(ctl, ctl.queue("scale", group=group, count=req["count"]))
        if group not in ctl.sup.specs:
            raise ControlError(f"no group {group!r}; groups: {', '.join(ctl.sup.specs)}")
        total = sum(n for g, n in ctl.counts.items() if g != group) + req["count"]
        try:
            fdbudget.check_workers(total, f"scale {group} {req['count']}")
        except fdbudget.FdBudgetExceeded as e:
            raise ControlError(str(e)) from None
        return _queued(ctl, ctl.queue("scale", group=group, count=req["count"]))

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        text = TRANSITIONS["scale"].help
        sc = sub.add_parser("scale", parents=[ctl, waiting], help=text,
                            description=f"{text}: start or stop workers of that group")
        sc.add_argument("group")
        sc.add_argument("count", type=int, metavar="N")
        sc.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        if args.count < 0:
            say_error(f"scale {args.group}: count must be >= 0, got {args.count}")
            return EXIT_USAGE
        client = connect()
        return _finish(client, client.scale(args.group, args.count),
                       f"scale {args.group} to {args.count}", args)


def _is_wait(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= MAX_WAIT


class OpStatus(Command):
    """Where a queued operation is: queued, running, done or failed. With ``wait`` > 0 an
    operation not ended yet is answered when it ends (or the wait is over), so a client
    learns of the end at once instead of at its next poll."""

    name = "op_status"
    schema = {"op": lambda v: is_int(v, *U32)}
    optional = {"wait": _is_wait}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any] | None:
        found = ctl.op(req["op"])
        if found is None:
            raise ControlError(f"no operation {req['op']} (finished long ago?)")
        if found.ended.is_set() or req.get("wait", 0) <= 0:
            return {"ok": True, **found.as_dict()}
        if ctl.follow(ident, req, MAX_FOLLOWERS):
            return None  # held: answered by later()
        return {"ok": True, **found.as_dict()}  # too many held: the client polls

    def later(self, ctl: Any, req: dict[str, Any], final: bool) -> dict[str, Any] | None:
        found = ctl.op(req["op"])
        if found is None:
            return {"ok": False, "error": f"no operation {req['op']} (finished long ago?)"}
        return {"ok": True, **found.as_dict()} if final or found.ended.is_set() else None


class Logs(Command):
    """Records after ``since``; with ``wait`` > 0 and none yet, the answer waits for some."""

    name = "logs"
    schema = {
        "since": lambda v: is_int(v, 0, 2**63 - 1),
        "group": lambda v: v is None or is_source(v),
        "limit": lambda v: is_int(v, 1, 1000),
        "wait": _is_wait,
    }

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any] | None:
        if req["since"] == 0:  # the first request of a `multibus logs`: an unknown name fails
            ctl.check_source(req["group"])
        reply = self.reply(ctl, req)
        if reply["records"] or req["wait"] <= 0:
            return reply
        if not ctl.follow(ident, req, MAX_FOLLOWERS):  # answering now would make it spin
            raise ControlError(f"{MAX_FOLLOWERS} `{PROG} logs -f` are following already, the "
                               "most at once; stop one of them (or use `logs` without -f)")
        return None

    def later(self, ctl: Any, req: dict[str, Any], final: bool) -> dict[str, Any] | None:
        reply = self.reply(ctl, req)
        return reply if final or reply["records"] else None

    @staticmethod
    def reply(ctl: Any, req: dict[str, Any]) -> dict[str, Any]:
        """The records a 'logs' request asks for, now (at most LOG_REPLY_BYTES of them)."""
        recs, nxt = ctl.records(req["since"], req["group"], req["limit"])
        out, size = [], 0
        for r in recs:
            size += len(r[4]) + 64
            if out and size > LOG_REPLY_BYTES:
                nxt = out[-1][0]
                break
            out.append(list(r))
        return {"ok": True, "records": out, "next": nxt}

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        lg = sub.add_parser("logs", parents=[ctl], help="show recent log lines (of GROUP)",
                            description="Show the supervisor's recent log lines (it keeps the "
                            "last 5000): every worker's, or those of GROUP; on a parent of "
                            "hosts also theirs, or those of HOST, HOST:GROUP or HOST:GROUP.N")
        lg.add_argument("group", nargs="?", metavar="GROUP",
                        help="a group, a worker (group.index) or 'supervisor'; a host, "
                        "HOST:GROUP or HOST:GROUP.N")
        lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
        lg.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                        help="how many recent lines (default 100, at most 1000)")
        lg.add_argument("--level", default=None, metavar="LEVEL", help="minimum level")
        lg.add_argument("--log-format", choices=("text", "json"), default=None)
        lg.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        from multibus.config import parse_level
        from multibus.logprinter import LogPrinter, fleet_sources

        client = connect()
        level = parse_level(args.level) if args.level else 0
        lines = max(0, min(args.lines, 1000))
        records: Iterable[Any]
        seen: list[str] = []
        if args.follow:
            records = client.follow(args.group, backlog=lines)
        else:  # asked even for -n 0, so that an unknown name fails
            recs = client.logs(0, args.group, max(1, lines))[0]
            records = recs[-lines:] if lines else []
            seen = [rec[3] for rec in records]
        groups = client.status()["groups"]  # a stable column: as wide as the widest name
        sources = [*fleet_sources({g["name"]: g["count"] for g in groups}), *seen]
        printer = LogPrinter(level, args.log_format or "text", sys.stdout, sources=sources)
        try:
            for rec in records:
                if rec[2] >= level:
                    printer.write(rec)
        except KeyboardInterrupt:
            pass
        return EXIT_OK


class Reload(Command):
    """Rolling reload (issue 17): queued like any transition, run by multibus.reload."""

    name = "reload"
    schema = {"groups": lambda v: isinstance(v, list) and len(v) <= 64
              and all(valid_group(g) or is_host_target(g) for g in v)}

    def answer(self, ctl: Any, ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
        _targets(ctl, [g for g in req["groups"] if is_host_target(g)])  # HOST:GROUP: theirs
        unknown = [g for g in req["groups"] if g not in ctl.sup.specs and not is_host_target(g)]
        if unknown:
            raise ControlError(f"no group {unknown[0]!r}; groups: {', '.join(ctl.sup.specs)}")
        return _queued(ctl, ctl.queue("reload", groups=list(dict.fromkeys(req["groups"]))))

    def add_parsers(self, sub: Any, ctl: argparse.ArgumentParser,
                    waiting: argparse.ArgumentParser) -> None:
        text = TRANSITIONS["reload"].help
        p = sub.add_parser("reload", parents=[ctl, waiting], help=text,
                           description=f"Rolling reload: {text}. Each replacement starts "
                           "while the old worker serves; once its bus is STARTED the old one "
                           "stops gracefully. A replacement that fails to start aborts the "
                           "reload (the old workers keep serving) and this exits 1 with its "
                           "error. SIGUSR2 to `multibus run` does the same for every group.")
        p.add_argument("groups", nargs="*", metavar="GROUP")
        p.set_defaults(control=self)

    def run(self, args: argparse.Namespace, connect: Callable[[], Any]) -> int:
        client = connect()
        what = "reload" + ("".join(f" {g}" for g in args.groups))
        return _finish(client, client.request("reload", groups=list(args.groups)), what, args)


COMMANDS: dict[str, Command] = {c.name: c for c in (Status(), OpCommand(), Scale(), OpStatus(),
                                                     Logs(), Signal(), Apply(), Reload())}


# --------------------------------------------------------------------------- CLI helpers

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


def _finish(client: Any, reply: dict[str, Any], what: str, args: argparse.Namespace) -> int:
    """Wait for a queued operation (unless --no-wait) and say how it went."""
    t0 = time.monotonic()
    label = f"{client.name}: {what}"
    if args.no_wait:
        print(f"{label} queued (op {reply['op']})")
        return EXIT_OK
    if what == "exit":
        if _wait_gone(int(reply["pid"]), args.timeout):
            note = f" ({reply['note']})" if reply.get("note") else ""
            print(f"{label}: supervisor (pid {reply['pid']}) exited "
                  f"in {time.monotonic() - t0:.2f}s{note}")
            return EXIT_OK
        say_error(f"{label}: supervisor (pid {reply['pid']}) still running after "
                  f"{args.timeout:g}s")
        return EXIT_FAIL
    try:
        done = client.wait_op(int(reply["op"]), args.timeout)
    except NotRunning:
        say_error(f"{label}: the supervisor exited before it was done")
        return EXIT_FAIL
    if done["state"] == "failed":
        say_error(f"{label} failed: {done['error']}")
        return EXIT_FAIL
    note = f" ({done['note']})" if done.get("note") else ""
    print(f"{label} done in {time.monotonic() - t0:.2f}s{note}")
    return EXIT_OK
