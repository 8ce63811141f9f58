"""The transitions a control request can queue, performed one at a time on the main thread.

An :class:`Action` is ``perform(control, bus state name, args)``: start, stop, restart,
graceful, exit, scale, signal, apply, reload and the recycler's replace, each a few lines
that hand the work to the supervisor (:mod:`multibus.groupops`, :mod:`multibus.reload`,
:mod:`multibus.reconcile`) and return a note for the client. ``TRANSITIONS`` is the table
the operation queue and :mod:`multibus.commands` (the requests that queue them) read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multibus.bus import state_name
from multibus.targets import unknown

__all__ = ["ACTIONS", "TRANSITIONS", "Action", "ControlError", "NotRunning", "state_of"]


class ControlError(RuntimeError):
    """A control request failed; the message is for the user."""


class NotRunning(ControlError):
    """No supervisor of that name is running."""


def state_of(bus: Any) -> str:
    """The bus state's name ('STARTED'), for a multibus Bus or cherrypy.engine."""
    return state_name(bus.state) or str(bus.state)


def _targets(ctl: Any, targets: list[str]) -> list[str]:
    """``targets`` without repeats, in a stable order (so the same ops coalesce); a
    ControlError names an unknown group or worker, as `scale` does."""
    hosts = ctl.hosts  # a parent of hosts: HOST:TARGETs are theirs
    local = targets if hosts is None else hosts.check_targets(targets)
    why = unknown(local, ctl.sup.specs, lambda: {r["name"] for r in ctl.sup.table()})
    if why:
        raise ControlError(why)
    return sorted(set(targets))


# --------------------------------------------------------------------------- transitions

Perform = Callable[[Any, str, dict[str, Any]], "str | None"]


def _groups(ctl: Any) -> Any:
    """The supervisor's per-group control (:class:`multibus.groupops.GroupOps`)."""
    return ctl.sup.groupops


def _start(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    groups = _groups(ctl)
    if args.get("targets"):
        return groups.start(args["targets"], state_of(ctl.bus))
    if state_of(ctl.bus) == "STARTED":
        down = groups.down()
        if not down:
            return "already STARTED"
        groups.start(down, "STARTED")  # every group: those stopped by a command too
        return f"started {', '.join(down)}"
    groups.release_all()  # every group, those stopped by a command or FATAL too
    ctl.bus.start()
    return None


def _stop_bus(ctl: Any) -> str | None:
    """Stop the bus; say which workers had to be killed meanwhile, and why (None: none)."""
    before = len(ctl.sup.kills)
    ctl.bus.stop()
    return _killed(ctl.sup.kills[before:])


def _killed(kills: list[tuple[str, str]]) -> str | None:
    """Which workers had to be killed, and why (None: none)."""
    if not kills:
        return None
    return (f"{len(kills)} worker{'s' if len(kills) != 1 else ''} had to be killed, their "
            "processes are gone: " + "; ".join(f"{name} ({why})" for name, why in kills))


def _stop(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    if args.get("targets"):
        killed = _killed(_groups(ctl).stop(args["targets"]))
        if killed:
            raise ControlError(killed)  # as `stop` of every group: the op fails
        return None if state == "STARTED" else f"the fleet is {state}"
    if state == "STOPPED":
        return "already STOPPED"
    killed = _stop_bus(ctl)
    if killed:
        raise ControlError(killed)  # the op fails: `multibus stop` prints it and exits 1
    return None


def _restart(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    if args.get("targets"):
        killed = _killed(_groups(ctl).stop(args["targets"])) if state == "STARTED" else None
        note = _groups(ctl).start(args["targets"], state_of(ctl.bus))
        return killed if killed else note
    killed = _stop_bus(ctl) if state != "STOPPED" else None
    note = _start(ctl, state, args)
    return killed if killed else note  # started again: the kills are a note, not a failure


def _graceful(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    if args.get("targets") and state == "STARTED":
        return _groups(ctl).graceful(args["targets"])
    if state != "STARTED":
        return f"nothing to reload: the fleet is {state}"
    ctl.bus.graceful()
    return None


def _exit(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    ctl.exit_func()
    return None


def _exit_host(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    """(a parent of hosts) Routed to multibus.downstream before it gets here."""
    raise ControlError(f"supervisor {ctl.name!r} takes no hosts: `exit HOST` is for a parent "
                       "of hosts ([downstream])")


def _replace(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    """Queued by the supervisor itself (max_memory / max_age: multibus.recycle)."""
    return ctl.sup.replace(args["worker"], args["pid"], args["reason"])


def _scale(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    group = args["group"]
    count = args.get("count")
    if count is None:  # SIGTTIN / SIGTTOU: one more / one fewer
        count = max(0, ctl.counts.get(group, 0) + args.get("delta", 0))
    ctl.sup.scale(group, count)
    ctl.counts[group] = count
    return f"{group}: {count} worker{'s' if count != 1 else ''}"


def _apply(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    """Re-read the fleet file ``args['file']``; change only what differs (see reconcile)."""
    from multibus.config import ConfigError, load
    from multibus.reconcile import apply_plan, plan

    try:
        specs = load(args["file"]).specs
    except ConfigError as e:
        raise ControlError(str(e)) from None
    p = plan(ctl.sup.specs, ctl.counts, specs)
    if p:
        apply_plan(ctl.sup, p, specs, state == "STARTED")
        ctl.counts.clear()
        ctl.counts.update((s.name, s.count) for s in specs)
    return p.describe()


def _signal(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    return _groups(ctl).signal(args["targets"], int(args["signal"]))


def _reload(ctl: Any, state: str, args: dict[str, Any]) -> str | None:
    if state != "STARTED":
        return f"nothing to reload: the fleet is {state}"
    return ctl.sup.reloader.reload(args.get("groups") or ())


@dataclass(frozen=True)
class Action:
    """A transition: ``perform(control, bus state name, args)`` runs it on the supervisor's
    main thread and returns a note for the client (or None). ``op``: sent as an 'op'
    request (the CLI subcommand of the same name)."""

    name: str
    help: str
    perform: Perform
    op: bool = True


TRANSITIONS: dict[str, Action] = {a.name: a for a in (
    Action("start", "start every worker bus, or those of TARGETs (spawning missing workers)",
           _start),
    Action("stop", "stop every worker bus, or those of TARGETs (processes stay; the "
           "supervisor stays)", _stop),
    Action("restart", "stop, then start every worker bus, or those of TARGETs", _restart),
    Action("graceful", "reload every worker bus, or those of TARGETs (bus 'graceful')",
           _graceful),
    Action("exit", "stop every worker, then the supervisor exits; on a parent of hosts, "
           "exit HOST: only that host's supervisor (its workers first)", _exit),
    Action("exit_host", "a host's supervisor exits (its workers first)", _exit_host, op=False),
    Action("scale", "run N workers of GROUP", _scale, op=False),
    Action("replace", "replace a worker gracefully (max_memory, max_age)", _replace, op=False),
    Action("signal", "send SIGNAL to the process group of each worker of TARGET", _signal,
           op=False),
    Action("apply", "re-read the fleet file; start, stop, scale and restart what changed",
           _apply, op=False),
    Action("reload", "replace the workers of GROUP (default: all) with new processes on new "
           "code, one surge at a time, with no failed request", _reload, op=False),
)}
ACTIONS = tuple(name for name, a in TRANSITIONS.items() if a.op)
