"""A child supervisor's link to its parent (``[upstream]``, ``multibus run --join``).

The link is a peer-role :class:`~multibus.transport.Bridge` over tcp + CURVE, named by the
host, on a small bus of its own (the *link bus*), not on the supervisor's: its lifecycle is
the parent's desired state for this host. The parent's ``start``/``stop``/``exit`` and
``graceful`` commands move the link bus (epochs, sequence numbers, acks and resends are the
bridge's, so a command is never lost), and its listeners queue the matching operation on
this supervisor's op queue (so they are serialized with local commands) and wait for it; the
link bus therefore reports STARTED/STOPPED to the parent only once this fleet is, and a
graceful that failed here is reported to the parent (the bridge's ``failed``). Targeted ops,
``scale`` and ``reload`` come as requests on the mirrored ``hosts.op`` channel and are
answered on ``hosts.done``.

Upstream this host sends its status (on the ``hosts.status`` channel: ``REPORT_MIN`` s after
a change of its state table, gathering the changes that follow; at once when it joined,
when its fleet got STARTED or STOPPED and when it answered a request; and every
``REPORT_EVERY`` s) and its log records: at most ``LOG_RATE`` a second while joined, none
while the parent is lost (the excess is dropped and counted, and the count said once the
link is back), so its backlog is bounded. They go up from the reporter thread in batches,
``LOG_BATCH`` s after the first of each: a fleet's start or stop logs a few lines per worker,
and sent one by one each line woke the link's I/O thread.

Partitions: the bridge publishes ``hub.lost`` after ``timeout`` seconds of silence (or at
once on a disconnect, which is then given ``timeout`` to heal). ``on_upstream_lost="stop"``
then stops the workers and opens a fresh link (a new peer epoch), so the parent's current
desired state is applied again once it is back; ``"keep"`` runs on with the same link, which
applies whatever the parent commanded meanwhile (a newer sequence number). Either way a
returning child converges to the parent's desired state.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

from multibus.actions import _targets, state_of
from multibus.bus import Bus, states
from multibus.hostconf import UpstreamConfig
from multibus.transport.bridge import Bridge

__all__ = ["CHANNELS", "LOG_RATE", "REPORT_EVERY", "Upstream"]

#: The mirrored channels between a parent and its hosts (see multibus.downstream).
CHANNELS = ("hosts.status", "hosts.op", "hosts.done")
REPORT_EVERY = 2.0  # seconds between status reports when nothing changes
REPORT_MIN = 0.1  # ... and this long after a change (and after the last report) at the soonest
LOG_RATE = 5000  # log records forwarded per second at most
LOG_BATCH = 0.05  # s from the first log record of a batch to its sending
OP_TIMEOUT = 600.0  # seconds a commanded operation may take here
SETTLED = ("Bus STARTED", "Bus STOPPED")  # the bus's lines once it is in that state
# seconds the link is held STARTING at most before it joins again (the bridge's applier
# waits 30 s at most for a bus to leave STARTING)
HOLD_LIMIT = 25.0


class _LinkBus(Bus):
    """The link's bus: its transitions are the parent's commands. Its own log lines ("Bus
    STARTED"...) only repeat this supervisor's, so they go up at debug level, as "link ...":
    the bridge reports a state change to the parent as it sends the line that says it. A
    link that was replaced or closed is ``retired``: its bus exits doing nothing here."""

    retired = False

    def log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        self.publish("log", f"link: {msg}", 10)

    def follow(self, state: Any) -> None:
        """Take ``state`` without running listeners: the link mirrors this supervisor's
        first start, which runs without it (the bridge reports the state it logs)."""
        self.state = state
        self.log(f"Bus {state.name}")


class Upstream:
    """Join ``control``'s supervisor (the Control socket of this process, whose op queue
    runs what the parent asks) to the parent in ``cfg``, as host ``host``."""

    def __init__(self, bus: Any, control: Any, cfg: UpstreamConfig, host: str) -> None:
        self.bus = bus
        self.control = control
        self.cfg = cfg
        self.host = host
        self.link: Bridge | None = None
        self.link_bus: _LinkBus | None = None
        self.joined = False
        self.dropped_logs = 0
        self._ever_joined = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._lost_at: float | None = None  # policy due at this monotonic time
        self._changed = True
        self._changed_at = 0.0  # when _changed was set
        self._urgent = False  # report now: joined, fleet STARTED or STOPPED, request answered
        self._held_at = 0.0  # when the link opened, held STARTING (the first start)
        self._closing = False
        self._gone = threading.Event()  # this fleet's workers have all exited
        self._window = (0.0, 0)  # (second, records forwarded in it)
        self._logs: collections.deque[tuple[Any, Any]] = collections.deque()  # to send up
        self._logs_due = 0.0  # when the oldest of them goes up
        self._thread: threading.Thread | None = None

    # -- plugin -----------------------------------------------------------------------

    def subscribe(self) -> Upstream:
        """Listen on the supervisor's bus and open the link now, before the fleet's first
        start, so joining (tcp, CURVE, hello, sync) overlaps that start. Until the start
        ends the link bus says STARTING, so a command from the parent waits for it (the
        bridge's applier waits while its bus is STARTING) and then applies to the fleet as
        it is: STARTED, or STOPPED if the start failed."""
        bus = self.bus
        bus.subscribe("start", self._first_started, 101)  # after the Supervisor's (75)
        bus.subscribe("stop", self._first_stopped, 1)  # the first start failed
        bus.subscribe("workers.changed", self._on_workers, 50)
        bus.subscribe("log", self._on_log, 3)
        bus.subscribe("exit", self._on_exit, 20)  # after the Supervisor's: workers are gone
        self._held_at = time.monotonic()
        self._open_link(hold=True)
        self._thread = threading.Thread(target=self._run, name=f"multibus-upstream {self.host}",
                                        daemon=True)
        self._thread.start()
        return self

    def _first_started(self, state: Any = states.STARTED) -> None:
        """The fleet's first start ended (its last start listener), or failed (its stop,
        ``state`` STOPPED): the link bus, held STARTING, takes that state."""
        bus = self.bus
        bus.unsubscribe("start", self._first_started)
        bus.unsubscribe("stop", self._first_stopped)
        lb = self.link_bus
        if lb is None or lb.state is not states.STARTING:
            return
        if time.monotonic() - self._held_at < HOLD_LIMIT:
            lb.follow(state)
            return
        # The link's applier waits this long at most for STARTING to end: a command it took
        # meanwhile may have come to nothing. A fresh link (a new peer epoch) is given the
        # parent's desired state again, and applies it to this fleet as it is now.
        self.bus.log(f"upstream: the first start took over {HOLD_LIMIT:g}s; joining again so "
                     "the parent's current state applies", 20)
        self._close_link()
        self._open_link(state=state)

    def _first_stopped(self) -> None:
        self._first_started(states.STOPPED)

    def _on_exit(self) -> None:
        self._gone.set()
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(5)  # it sends the last log records up
        self._close_link()

    # -- the link ---------------------------------------------------------------------

    def _open_link(self, hold: bool = False, state: Any = None) -> None:
        """A fresh link bus, in this fleet's state (``hold``: STARTING, until the first
        start ends; ``state``: that one, the fleet's while it is still moving), and its
        bridge (a new peer epoch)."""
        lb = _LinkBus()
        for channel, cb in (("start", self._cmd_start), ("stop", self._cmd_stop),
                            ("graceful", self._cmd_graceful), ("exit", self._cmd_exit)):
            lb.subscribe(channel, lambda cb=cb: lb.retired or cb())
        for channel, cb in (("hub.joined", self._on_joined), ("hub.lost", self._on_lost),
                            ("hosts.op", self._on_op)):
            lb.subscribe(channel, lambda *a, cb=cb: lb.retired or cb(*a))
        if hold or state is not None:
            lb.follow(states.STARTING if hold else state)
        elif state_of(self.bus) == "STARTED":
            lb.start()  # nothing to do here: the fleet is STARTED already
        timeout = self.cfg.timeout
        link = Bridge(lb, role="peer", name=self.host, endpoints=self.cfg.endpoints(),
                      channels=CHANNELS, curve=self.cfg.curve, heartbeat=timeout / 4,
                      peer_timeout=timeout)
        self.link_bus, self.link = lb, link
        link.subscribe()

    def _close_link(self) -> None:
        link, lb = self.link, self.link_bus
        self.link = self.link_bus = None
        self.joined = False
        if link is not None and lb is not None:
            lb.retired = True
            link.unsubscribe()
            lb.exit()  # EXITED, doing nothing (retired)

    def _on_joined(self, parent: str = "", *args: Any) -> None:
        with self._lock:
            self.joined = self._ever_joined = True
            self._lost_at = None
            self._changed = self._urgent = True
            dropped, self.dropped_logs = self.dropped_logs, 0
            self._wake.notify_all()
        self.bus.log(f"upstream: joined {parent or 'the parent'} at {self.cfg.address} as "
                     f"host {self.host!r}")
        if dropped:
            self.bus.log(f"upstream: {dropped} log lines were not sent to the parent (it was "
                         "lost, or they came too fast)", 30)

    def _on_lost(self, reason: str = "", *args: Any) -> None:
        grace = 0.0 if reason == "heartbeat timeout" else self.cfg.timeout
        with self._lock:
            self.joined = False
            self._lost_at = time.monotonic() + grace
            self._wake.notify_all()
        self.bus.log(f"upstream: lost the parent at {self.cfg.address} ({reason}); "
                     f"on_upstream_lost = {self.cfg.on_lost!r}", 30)

    def _apply_policy(self) -> None:
        """(upstream thread) The parent stayed away for ``timeout``."""
        if self.cfg.on_lost == "keep":
            self.bus.log("upstream: the parent is still away; workers keep running "
                         "(on_upstream_lost = 'keep')", 30)
            return
        self.bus.log("upstream: the parent is still away; stopping the workers "
                     "(on_upstream_lost = 'stop')", 30)
        self._run_op("stop")
        self._close_link()
        self._open_link()  # a new epoch: the parent's desired state is applied on return

    # -- what the parent asks -----------------------------------------------------------

    def _run_op(self, action: str, **args: Any) -> Any:
        """Queue ``action`` on this supervisor's op queue; return the op once it ended."""
        op = self.control.queue(action, **args)
        deadline = time.monotonic() + OP_TIMEOUT
        # woken as it ends (a 20 ms poll here was up to 20 ms on every fleet-wide start
        # and stop); looks at _gone (this process exits) now and then
        while not op.ended.wait(0.25):
            if self._gone.is_set() or time.monotonic() >= deadline:
                break
        return op

    def _transition(self, action: str, wanted: str) -> None:
        if state_of(self.bus) == wanted and not self.control.sup.groupops.down():
            return  # this fleet is there already
        op = self._run_op(action)
        if op.state == "failed":
            raise RuntimeError(f"{action} failed on host {self.host}: {op.error}")

    def _cmd_start(self) -> None:
        self._transition("start", "STARTED")

    def _cmd_stop(self) -> None:
        if getattr(self.link_bus, "exiting", False):
            return  # a stop on the way to exit: _cmd_exit stops and exits in one round
        if state_of(self.bus) != "STOPPED":
            self._transition("stop", "STOPPED")

    def _cmd_graceful(self) -> None:
        op = self._run_op("graceful")
        if op.state == "failed":  # the link's applier reports it to the parent
            raise RuntimeError(f"graceful failed on host {self.host}: {op.error}")

    def _cmd_exit(self) -> None:
        if self._closing:
            return  # this process is exiting anyway
        self.control.queue("exit")
        self._gone.wait(OP_TIMEOUT)  # answered once every worker has exited

    def _on_op(self, host: str, op_id: int, action: str, args: dict[str, Any]) -> None:
        """A request on 'hosts.op' (every host sees it: the parent mirrors to all)."""
        if host != self.host:
            return
        threading.Thread(target=self._answer_op, args=(op_id, action, args),
                         name=f"multibus-upstream-op {op_id}", daemon=True).start()

    def _answer_op(self, op_id: int, action: str, args: dict[str, Any]) -> None:
        try:
            if args.get("targets"):
                args = {**args, "targets": _targets(self.control, args["targets"])}
            op = self._run_op(action, **args)
            state, error, note = op.state, op.error, op.note
        except Exception as e:  # noqa: BLE001 - a refusal (queue full): said upstream
            state, error, note = "failed", str(e), None
        self._report_now()
        lb = self.link_bus
        if lb is not None:
            lb.publish("hosts.done", self.host, op_id, state, error, note)

    # -- upstream: status and logs ------------------------------------------------------

    def _on_workers(self, *args: Any) -> None:
        with self._lock:
            if not self._changed:  # the reporter wakes once per report, not per change
                self._changed, self._changed_at = True, time.monotonic()
                self._wake.notify_all()

    def _report_now(self) -> None:
        with self._lock:
            self._changed = self._urgent = True
            self._wake.notify_all()

    def _on_log(self, msg: Any = "", level: Any = 20, *args: Any) -> None:
        if msg in SETTLED:  # this fleet got there: the parent hears it now, not REPORT_MIN on
            self._report_now()
        lb = self.link_bus
        if lb is None or not self.joined:
            self.dropped_logs += self._ever_joined  # before the first join: not news
            return
        second = int(time.monotonic())
        start, n = self._window
        if start != second:
            start, n = second, 0
        if n >= LOG_RATE:
            self.dropped_logs += 1
            return
        self._window = (start, n + 1)
        with self._lock:
            self._logs.append((msg, level))
            if len(self._logs) == 1:  # a batch begins: the reporter sends it LOG_BATCH on
                self._logs_due = time.monotonic() + LOG_BATCH
                self._wake.notify_all()

    def _send_logs(self) -> None:
        """(upstream thread) Send the queued log records up, on the link bus's 'log' (its
        bridge forwards them)."""
        logs, lb = self._logs, self.link_bus
        while logs:
            msg, level = logs.popleft()
            if lb is not None:
                lb.publish("log", msg, level)

    def status(self) -> dict[str, Any]:
        """What the parent shows of this host: this supervisor's status document, without
        its local-only parts."""
        st = self.control.status()
        return {"state": st["state"], "pid": os.getpid(), "uptime": st["uptime"],
                "groups": st["groups"], "workers": st["workers"],
                "containment": st.get("containment")}

    def _run(self) -> None:
        """Report the status when it changed (or every REPORT_EVERY s); apply the lost
        policy when it is due."""
        last = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                due = [last + REPORT_EVERY]
                soonest = max(last, self._changed_at) + REPORT_MIN
                if self._urgent:
                    due.append(now)
                elif self._changed:
                    due.append(soonest)
                if self._lost_at is not None:
                    due.append(self._lost_at)
                if self._logs:
                    due.append(self._logs_due)
                wait = min(due) - now
                if wait > 0 and not self._closing:
                    self._wake.wait(wait)
                if self._closing:
                    break
                now = time.monotonic()
                soonest = max(last, self._changed_at) + REPORT_MIN  # woken by a change
                policy = self._lost_at is not None and now >= self._lost_at
                if policy:
                    self._lost_at = None
                report = self.joined and (now >= last + REPORT_EVERY or self._urgent or (
                    self._changed and now >= soonest))
                if report:
                    self._urgent = False
                send = bool(self._logs) and now >= self._logs_due
            if send:
                self._send_logs()
            if policy:
                self._apply_policy()
            if report:
                self._changed = False
                last = now
                lb = self.link_bus
                try:
                    if lb is not None:
                        lb.publish("hosts.status", self.host, self.status())
                except Exception as e:  # noqa: BLE001 - never let the reporter die
                    self.bus.log(f"upstream: status report failed: {e}", 30)
            elif not self.joined:
                last = now
        self._send_logs()  # closing: the last records go up before the link closes
