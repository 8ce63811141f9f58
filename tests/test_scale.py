"""Issue 18, item 3 and 4: a large fleet keeps its supervisor responsive, and the output of
many workers reaches the supervisor in order per worker with nothing lost."""

from __future__ import annotations

import re
import threading
import time

import pytest
from test_supervisor import Fleet

from multibus.control import ControlClient, ControlError


class StatusProbe:
    """Ask supervisor ``name`` for its status over and over (bounded: ``limit`` s) while a
    fleet starts; keeps what each answer showed and the pids it names (for cleanup)."""

    def __init__(self, name: str, pids: set[int], limit: float = 60.0) -> None:
        self.client = ControlClient(name, timeout=10.0)
        self.pids, self.limit = pids, limit
        self.sizes: list[int] = []
        self.started: list[int] = []  # per answer: how many workers it showed STARTED
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        end = time.monotonic() + self.limit
        while not self.done.is_set() and time.monotonic() < end:
            try:
                st = self.client.status()
            except ControlError:  # not up yet (NotRunning is one)
                self.done.wait(0.01)
                continue
            self.sizes.append(len(st["workers"]))
            self.started.append(sum(w["state"] == "STARTED" for w in st["workers"]))
            self.pids.update(w["pid"] for w in st["workers"] if w["pid"])

    def stop(self) -> None:
        self.done.set()
        self.thread.join(15)


def _status_answers_during_the_start(n: int, timeout: float) -> None:
    """Status is not held back until the start is over: answers come while only some of the
    ``n`` workers are STARTED, at several stages of it. (How fast it answers is measured by
    ``benchmarks/bench_fleet.py``, never asserted here.)"""
    f = Fleet("--no-table", "--start-timeout", str(timeout), n=n)
    probe = StatusProbe(f.name, f.pids, limit=timeout + 30)
    try:
        f.wait_line("^FLEET STARTED", timeout + 30)
        probe.stop()
        midway = {k for k, size in zip(probe.started, probe.sizes, strict=True)
                  if size == n and 0 < k < n}
        assert len(midway) >= 3, (f"status answered at {sorted(midway)} STARTED of {n} "
                                  "during the start; expected several stages")
        f.ctrl_c()
        assert f.wait(30) == 0
        f.wait_line("^CHILDREN 0$", 1)
        f.assert_all_gone()
    finally:
        probe.stop()
        f.close()


@pytest.mark.timeout(120)
def test_status_answers_while_150_workers_start():
    _status_answers_during_the_start(150, 30)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_status_answers_while_1000_workers_start():
    _status_answers_during_the_start(1000, 60)


@pytest.mark.timeout(120)
def test_lines_of_many_workers_arrive_in_order_per_worker_nothing_lost():
    n = 20
    f = Fleet("--no-table", "--target", "targets.jobs:numbered_lines", n=n)
    try:
        f.wait_line("^FLEET STARTED", 60)
        rx = re.compile(r"^LOG 20 (w\.\d+) \| line (\d+)$")
        deadline = time.monotonic() + 60
        while True:
            with f.cond:
                got: dict[str, list[int]] = {}
                for line in f.lines:
                    m = rx.match(line)
                    if m:
                        got.setdefault(m.group(1), []).append(int(m.group(2)))
            if sum(map(len, got.values())) >= n * 2000 or time.monotonic() > deadline:
                break
            with f.cond:
                f.cond.wait(0.5)
        assert sorted(got) == sorted(f"w.{i}" for i in range(n))
        for name, seq in got.items():
            assert seq == list(range(2000)), f"{name}: lines lost or out of order"
        f.ctrl_c()
        assert f.wait(30) == 0
    finally:
        f.close()


# -- the supervisor's cost per event does not grow with the fleet ---------------------------------

def test_waiting_for_a_start_looks_again_only_at_the_workers_an_event_touched():
    """500 workers reporting STARTED one by one: the waiter re-reads the fleet a bounded
    number of times, not once per event (O(N) per event made a 1,000-worker start O(N^2))."""
    from types import SimpleNamespace

    from multibus.bus import Bus
    from multibus.fleet import Fleet as FleetModel
    from multibus.fleet import WorkerState
    from multibus.keeper import Keeper
    from multibus.restart import RestartPolicy
    from multibus.specs import Intensity, WorkerSpec

    n = 500
    fleet = FleetModel([WorkerSpec(name="w", target="x:y", count=n)])
    keeper = Keeper(Bus(), "t", fleet, RestartPolicy(Intensity(), (0.1, 1.0)),
                    log=lambda msg, level=20: None, log_output=False, term_timeout=1.0)
    for i, w in enumerate(fleet.slots()):
        w.child = SimpleNamespace(returncode=None, pid=10000 + i)  # a live process
        w.pid, w.since, w.state = 10000 + i, time.monotonic(), WorkerState.JOINED
    reads = []
    slots = fleet.slots
    fleet.slots = lambda: reads.append(1) or slots()  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            keeper.wait_started(None, time.monotonic())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # one wake-up of the waiter per event: the waiter is back waiting before the next one
    back = threading.Event()
    cond_wait = keeper.cond.wait

    def wait_and_say(timeout: float | None = None) -> bool:
        back.set()
        return cond_wait(timeout)

    keeper.cond.wait = wait_and_say  # type: ignore[method-assign]
    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        for i in range(n):
            assert back.wait(10), "the waiter did not wait again"
            with keeper.cond:
                back.clear()
                keeper.peer_state(f"w.{i}", "STARTED")
        waiter.join(30)
    finally:
        with keeper.cond:
            keeper.fatal = keeper.fatal or "test over"  # never leave the waiter behind
            keeper.cond.notify_all()
        waiter.join(5)
    assert not errors and not waiter.is_alive()
    assert len(reads) <= 3, f"the fleet was re-read {len(reads)} times for {n} events"


def test_zygote_forks_many_workers_pipelined_each_one_answered_in_order():
    """spawn_many: requests in flight while the zygote forks; one child per request, in
    order, each running the worker it was asked for."""
    import sys

    from multibus.procs import ProcessManager
    from multibus.worker import worker_env
    from multibus.zygoteclient import ZygoteClient

    lines: dict[str, list[str]] = {}
    exited = threading.Event()
    gone: set[str] = set()
    n = 40

    def on_exit(c) -> None:
        gone.add(c.name)
        if len(gone) >= n + 1:
            exited.set()

    pm = ProcessManager(on_line=lambda c, s, ln: lines.setdefault(c.name, []).append(ln),
                        on_exit=on_exit).start()
    got: list = []
    done = threading.Event()

    def go() -> None:
        try:
            z = ZygoteClient.launch(pm, sys.executable, [], ())
            # a bad option: each worker says so naming itself, and exits
            got.extend(z.spawn_many([(f"w.{i}", ["--bogus", f"w.{i}"], worker_env(None),
                                      None) for i in range(n)]))
            z.shutdown()
        finally:
            done.set()

    try:
        pm.call_soon(go)
        assert done.wait(60)
        assert [c.name for c, why in got] == [f"w.{i}" for i in range(n)]
        assert all(c is not None and c.data.get("launch") is None for c, why in got)
        assert len({c.pid for c, why in got}) == n
        assert exited.wait(60), f"not exited: {n + 1 - len(gone)}"
        for i in range(n):
            assert any("--bogus" in ln for ln in lines.get(f"w.{i}", [])), lines.get(f"w.{i}")
    finally:
        pm.close()
