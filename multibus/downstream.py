"""A parent supervisor's child supervisors, one per host (``[downstream]``).

The parent binds a hub-role :class:`~multibus.transport.Bridge` on ``listen`` (tcp, CURVE,
a ZAP allow-list of the hosts' public keys, each bound to its host's name: a host can join
only under its own) next to its local workers' hub; each child
supervisor joins it as a peer named by its host (:mod:`multibus.upstream`). Hosts hear only
the parent: what one publishes is not relayed to the others (``relay=False``), and the
parent takes a host's status reports and answers only from that host itself. Fleet-wide
lifecycle is the bridge's desired state: the parent bus's ``start``, ``stop`` and ``exit``
command every host (and every host that joins later) and wait until each connected host's
link reports the state, i.e. until its fleet got there. ``graceful`` is a bridge command too
(a graceful generation, resent until acked, so a host away meanwhile gets it when it is
back): like a local graceful, which only tells its workers, it waits for nothing (an ack
wait cost 35-100 ms with 8 hosts x 25 workers on 2 cores); a host where it failed is logged
when its link says so (``peer.failed``). On
Ctrl-C the parent's stop (which opens an exit) tells every host to exit at once, waits until
each has left, then stops its own workers. Targeted ops (``HOST:GROUP``, ``HOST:GROUP.N``),
``scale HOST:GROUP N`` and ``reload [HOST:GROUP...]`` are requests on the mirrored
``hosts.op`` channel, answered on ``hosts.done``. ``exit HOST`` commands that host's link
alone to exit (its supervisor stops its workers and exits); once it has left, its link
record is forgotten, so the host started again joins at the fleet's desired state.

Each host reports its status on ``hosts.status``; :meth:`Downstream.extend_status` adds it to
the parent's status document: a ``hosts`` list (name, state: the host's fleet state or
LOST, seconds since last seen) and the host's groups and workers rows, each with ``host``.
A host is LOST when it is silent for ``timeout`` seconds (or its connection is gone); it
keeps its last rows until it returns.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from multibus.actions import TRANSITIONS, ControlError
from multibus.control import BRIDGE_COUNTERS
from multibus.hostconf import DownstreamConfig
from multibus.logview import SUPERVISOR
from multibus.targets import split_host, unknown
from multibus.transport.bridge import Bridge
from multibus.upstream import CHANNELS

__all__ = ["Downstream", "Host"]

WAIT = 300.0  # seconds a fleet-wide transition waits for the hosts at most


@dataclass
class Host:
    """What the parent knows of one host."""

    name: str
    doc: dict[str, Any] | None = None  # its last status report
    connected: bool = False
    link_state: str | None = None  # the state its link reports (the parent's command, done)
    lost: str | None = None  # why it was lost (None: it is not)
    failed: str | None = None  # the last command that failed there
    seen: float = field(default_factory=time.monotonic)


class Downstream:
    """Take child supervisors on ``cfg.listen`` for the parent on ``bus`` named ``name``."""

    def __init__(self, bus: Any, cfg: DownstreamConfig, name: str) -> None:
        self.bus = bus
        self.cfg = cfg
        self.name = name
        self.hosts: dict[str, Host] = {}
        self.bridge: Bridge | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._done: dict[int, tuple[str, str | None, str | None]] = {}
        self._asked: dict[int, str] = {}  # op id -> host, while waiting
        self.notes: list[str] = []  # of the last requests' answers

    def subscribe(self) -> Downstream:
        timeout = self.cfg.timeout
        self.bridge = Bridge(self.bus, role="hub", name=self.name, endpoints=self.cfg.listen,
                             channels=CHANNELS, curve=self.cfg.curve, heartbeat=timeout / 4,
                             peer_timeout=timeout, relay=False).subscribe()
        for channel, cb, prio in (
            ("start", self._on_start, 80), ("stop", self._on_stop, 35),
            ("graceful", self._on_graceful, 50), ("exit", self._on_exit, 5),
            ("peer.joined", self._joined, 50), ("peer.state", self._state, 50),
            ("peer.lost", self._lost, 50), ("peer.failed", self._failed, 50),
            ("hosts.status", self._status, 50), ("hosts.done", self._op_done, 50),
        ):
            self.bus.subscribe(channel, cb, prio)
        hosts = sorted(name for _, name in self.cfg.curve.names)
        self.bus.log(f"downstream: hosts join at {self.cfg.listen} (allowed: "
                     f"{', '.join(hosts) or f'{len(self.cfg.curve.allowed)} keys'})")
        return self

    # -- events (the bridge's dispatch thread) ----------------------------------------

    def _host(self, name: str, new: bool = False) -> Host | None:
        host = self.hosts.get(name)
        if host is None and new and self.bridge is not None and name in self.bridge.peers():
            host = self.hosts[name] = Host(name)
        return host

    def _joined(self, name: str, pid: Any = None, *args: Any) -> None:
        with self._cond:
            host = self._host(name, new=True)
            if host is None:
                return  # a local worker (the supervisor's own hub)
            returned = host.lost is not None
            host.connected, host.lost, host.seen = True, None, time.monotonic()
            self._cond.notify_all()
        self.bus.log(f"downstream: host {name} {'rejoined' if returned else 'joined'} "
                     f"(pid {pid})")

    def _state(self, name: str, state: str = "", *args: Any) -> None:
        with self._cond:
            host = self._host(name)
            if host is not None:
                host.link_state, host.seen = state, time.monotonic()
                self._cond.notify_all()

    def _lost(self, name: str, reason: str = "", *args: Any) -> None:
        with self._cond:
            host = self._host(name)
            if host is None:
                return
            host.connected, host.lost = False, reason or "lost"
            self._cond.notify_all()
        level = 20 if reason in ("left", "exited") else 30
        self.bus.log(f"downstream: host {name} {'left' if level == 20 else 'LOST'} "
                     f"({reason})", level)

    def _failed(self, name: str, state: Any = None, error: str = "", *args: Any) -> None:
        with self._cond:
            host = self._host(name)
            if host is None:
                return
            host.failed = f"{state or 'graceful'} failed: {error}"
            self._cond.notify_all()
        if state is None:  # nobody waits for a graceful's end: say it now
            self.bus.log(f"downstream: graceful failed on {name}: {error}", 40)

    def _from(self, name: str) -> bool:
        """Whether the publish being delivered came from host ``name`` itself (a host may
        report only its own status and answers)."""
        return self.bridge is not None and self.bridge.origin() == name

    def _status(self, name: str, doc: Any = None, *args: Any) -> None:
        if isinstance(doc, dict) and self._from(name):
            with self._cond:
                host = self._host(name, new=True)
                if host is not None:
                    host.doc, host.seen = doc, time.monotonic()
                    self._cond.notify_all()

    def _op_done(self, name: str, op_id: int, state: str, error: Any = None,
                 note: Any = None, *args: Any) -> None:
        with self._cond:
            if self._asked.get(op_id) == name and self._from(name):
                self._done[op_id] = (state, error, note)
                self._cond.notify_all()

    # -- fleet-wide lifecycle (the parent bus's channels) -------------------------------

    def _connected(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.connected]

    def _wait(self, done: Any, what: str) -> None:
        """Wait until ``done(host)`` for every connected host (lost ones are not waited
        for); log the hosts that did not get there within WAIT."""
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                late = [h.name for h in self._connected() if not done(h)]
                left = deadline - time.monotonic()
                if not late or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        if late:
            self.bus.log(f"downstream: {what}: no answer within {WAIT:g}s from "
                         f"{', '.join(sorted(late))}", 30)

    def _command(self, action: str, state: str) -> None:
        assert self.bridge is not None
        with self._cond:
            for h in self.hosts.values():
                h.failed = None
        self.bridge.command(action)
        self._wait(lambda h: h.link_state == state or h.failed is not None,
                   f"{action} of the hosts")
        failed = [f"{h.name}: {h.failed}" for h in self.hosts.values() if h.failed]
        if failed:
            self.bus.log(f"downstream: {action} failed on {'; '.join(failed)}", 40)

    def _on_start(self) -> None:
        self._command("start", "STARTED")

    def _on_stop(self) -> None:
        if getattr(self.bus, "exiting", False):
            self._exit_hosts()  # Ctrl-C, exit: every host exits, then the local workers stop
        else:
            self._command("stop", "STOPPED")

    def _on_exit(self) -> None:
        self._exit_hosts()

    def _exit_hosts(self) -> None:
        assert self.bridge is not None
        self.bridge.command("exit")
        self._wait(lambda h: False, "exit of the hosts")  # until each has left

    def _on_graceful(self) -> None:
        """Every host reloads: a bridge command, resent until each host acked it (one away
        now gets it once back). Nothing waits for it, as a local graceful does not wait for
        its workers; a host where it fails is logged by :meth:`_failed`."""
        assert self.bridge is not None
        self.bridge.command("graceful")

    # -- requests to hosts ------------------------------------------------------------

    def _ask(self, asks: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
        """Send each host its request (action, args), all at once, and wait for the
        answers; return the errors ('host: why'). The notes are left in ``self.notes``."""
        with self._cond:
            ids = {next(self._ids): host for host in asks}
            self._asked.update(ids)
        for op_id, host in ids.items():
            action, args = asks[host]
            self.bus.publish("hosts.op", host, op_id, action, args)
        errors, notes = [], []
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                waiting = [i for i in ids if i not in self._done and self._host_up(ids[i])]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            for op_id, host in ids.items():
                self._asked.pop(op_id, None)
                lost = "the host was lost" if not self._host_up(host) else "no answer"
                state, error, note = self._done.pop(op_id, ("failed", lost, None))
                if state == "failed":
                    errors.append(f"{host}: {error}")
                elif note:
                    notes.append(f"{host}: {note}")
        self.notes = notes
        return errors

    def _host_up(self, name: str) -> bool:
        host = self.hosts.get(name)
        return host is not None and host.connected

    def check_targets(self, targets: list[str]) -> list[str]:
        """The local ones of ``targets``; ControlError names an unknown host, or a group or
        worker that host does not have."""
        local = []
        for t in targets:
            host, rest = split_host(t)
            if host is None:
                local.append(t)
                continue
            h = self.hosts.get(host)
            if h is None or h.doc is None:
                known = ", ".join(sorted(self.hosts)) or "none has joined"
                raise ControlError(f"no host {host!r}; hosts: {known}")
            if not h.connected:
                raise ControlError(f"host {host!r} is LOST ({h.lost}); try again once it "
                                   "is back")
            why = unknown([rest], [g["name"] for g in h.doc["groups"]],
                          lambda h=h: {w["name"] for w in h.doc["workers"]})
            if why:
                raise ControlError(f"host {host}: {why}")
        return local

    def names(self) -> str:
        """The hosts that joined, for an error message ('none has joined': none)."""
        with self._cond:
            return ", ".join(sorted(self.hosts)) or "none has joined"

    def _no_host(self, name: str) -> ControlError:
        return ControlError(f"no host {name!r}; hosts: {self.names()}")

    def has_host(self, name: str) -> bool:
        with self._cond:
            return name in self.hosts

    def check_log_source(self, host: str, rest: str | None) -> None:
        """ControlError unless ``host`` joined (LOST or not: its records stay) and ``rest``
        (if given) is 'supervisor', one of its groups, or one of its workers."""
        with self._cond:
            h = self.hosts.get(host)
            if h is None:
                raise self._no_host(host)
            doc = h.doc
        if rest in (None, SUPERVISOR) or doc is None:
            return
        why = unknown([rest], [g["name"] for g in doc["groups"]],
                      lambda: {w["name"] for w in doc["workers"]})
        if why:
            raise ControlError(f"host {host}: {why}")

    def check_hosts(self, names: list[str]) -> None:
        """ControlError naming the first of ``names`` that is not a connected host."""
        with self._cond:
            for name in names:
                h = self.hosts.get(name)
                if h is None:
                    raise self._no_host(name)
                if not h.connected:
                    raise ControlError(f"host {name!r} is not connected ({h.lost}); nothing "
                                       "to exit there")

    def exit_hosts(self, names: list[str]) -> str:
        """``exit HOST``: tell these hosts' supervisors to exit (each stops its workers
        first) and wait until each has left. Their records are then forgotten by the
        bridge, so one that is started again joins at the fleet's desired state (its last
        one, EXITING, would make it exit at once)."""
        assert self.bridge is not None
        self.bridge.command("exit", names)
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                late = [n for n in names if self._host_up(n)]
                left = deadline - time.monotonic()
                if not late or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        for name in names:
            if name not in late:
                self.bridge.forget(name)
        if late:
            raise ControlError(f"{', '.join(late)} did not exit within {WAIT:g}s")
        return f"{', '.join(names)} exited"

    def routes(self, op: Any) -> bool:
        """Whether op goes (partly) to hosts: a HOST:TARGET, scale HOST:GROUP, exit HOST."""
        if op.action == "exit_host":
            return True
        if op.action == "reload" and not op.args.get("groups"):
            return bool(self._connected())  # every group here and on every host
        names = op.args.get("targets") or op.args.get("groups") or [op.args.get("group")]
        return any(isinstance(n, str) and split_host(n)[0] for n in names)

    def perform(self, ctl: Any, state: str, op: Any) -> str | None:
        """Run ``op``: its local targets here (as the local op would), the others on their
        hosts (all at once); a failure on any host fails the op, naming it."""
        args = dict(op.args)
        if op.action == "exit_host":
            return self.exit_hosts(args["hosts"])
        asks: dict[str, tuple[str, dict[str, Any]]] = {}
        notes = []
        if op.action == "scale":
            host, group = split_host(args["group"])
            asks[host] = ("scale", {"group": group, "count": args["count"]})
        elif op.action == "reload":  # rolling reload: groups here, HOST:GROUPs there
            groups = args.get("groups") or []
            local, remote = [g for g in groups if not split_host(g)[0]], {}
            for g in groups:
                host, rest = split_host(g)
                if host is not None:
                    remote.setdefault(host, []).append(rest)
            if not groups:
                remote = {h.name: [] for h in self._connected()}
            asks = {h: ("reload", {"groups": gs}) for h, gs in remote.items()}
            if local or not groups:
                note = TRANSITIONS["reload"].perform(ctl, state, {"groups": local})
                if note:
                    notes.append(note)
        else:
            local, remote = [], {}
            for t in args["targets"]:
                host, rest = split_host(t)
                if host is None:
                    local.append(t)
                else:
                    remote.setdefault(host, []).append(rest)
            asks = {h: (op.action, {**args, "targets": ts}) for h, ts in remote.items()}
            if local:
                note = TRANSITIONS[op.action].perform(ctl, state, {**args, "targets": local})
                if note:
                    notes.append(note)
        errors = self._ask(asks)
        if errors:
            raise ControlError("; ".join(errors))
        return "; ".join(notes + self.notes) or None

    # -- status -----------------------------------------------------------------------

    def extend_status(self, st: dict[str, Any]) -> None:
        """Add ``hosts`` and each host's groups and workers (with ``host``) to ``st``."""
        peers = self.bridge.peers() if self.bridge is not None else {}
        now = time.monotonic()
        hosts = []
        with self._cond:
            for name in sorted(self.hosts):
                h = self.hosts[name]
                doc = h.doc or {"state": None, "groups": [], "workers": []}
                seen = peers.get(name, {}).get("last_seen") or h.seen
                hosts.append({"name": name, "state": "LOST" if h.lost and h.lost not in (
                    "left", "exited") else ("EXITED" if h.lost else doc["state"]),
                    "connected": h.connected, "pid": doc.get("pid"),
                    "last_seen": round(max(0.0, now - seen), 1), "lost": h.lost,
                    "error": h.failed, "workers": len(doc["workers"])})
                st["groups"] += [{**g, "host": name} for g in doc["groups"]]
                st["workers"] += [{**w, "host": name} for w in doc["workers"]]
        st["hosts"] = hosts
        if self.bridge is not None:  # its trouble counts with the local hub's
            stats = self.bridge.stats()
            counts = st.setdefault("counters", {}).setdefault("bridge", {})
            for k in BRIDGE_COUNTERS:
                counts[k] = counts.get(k, 0) + stats.get(k, 0)
