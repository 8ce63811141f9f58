"""The Bridge's parts on their own: stats, warning rate limit, dispatch errors, I/O errors."""

from __future__ import annotations

import os
import random
import threading

import pytest
from progs.procio import wait_for

from multibus.bus import Bus
from multibus.transport.bridge import Bridge
from multibus.transport.dispatch import Dispatcher
from multibus.transport.outbox import ThreadState
from multibus.transport.stats import BridgeStats, RateLimit


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{random.getrandbits(24):x}"


@pytest.mark.timeout(30)
def test_stats_lose_no_count_under_many_reporting_threads():
    """Other threads report while the owner counts and folds: every count arrives, and a
    snapshot taken meanwhile never goes backwards."""
    stats = BridgeStats()
    threads_n, per_thread = 8, 20_000
    go = threading.Event()
    stop_owner = threading.Event()
    seen: list[int] = []

    def reporter() -> None:
        go.wait(10)
        for _ in range(per_thread):
            stats.report("dispatched")

    def owner() -> None:
        go.wait(10)
        while not stop_owner.is_set():
            stats.sent += 1
            stats.fold()

    def reader() -> None:
        go.wait(10)
        while not stop_owner.is_set():
            seen.append(stats.snapshot()["dispatched"])

    reporters = [threading.Thread(target=reporter) for _ in range(threads_n)]
    others = [threading.Thread(target=owner), threading.Thread(target=reader)]
    try:
        for t in reporters + others:
            t.start()
        go.set()
        for t in reporters:
            t.join(20)
    finally:
        go.set()
        stop_owner.set()
        for t in reporters + others:
            t.join(20)
    snap = stats.snapshot()
    assert snap["dispatched"] == threads_n * per_thread
    stats.fold()
    assert stats.dispatched == threads_n * per_thread
    assert snap["sent"] == stats.sent > 0
    assert seen == sorted(seen), "a snapshot went backwards"


def test_stats_snapshot_lists_every_counter_and_invalid_reasons():
    stats = BridgeStats()
    stats.count_invalid("frames")
    stats.count_invalid("frames")
    stats.count_invalid("size")
    snap = stats.snapshot()
    for key in ("sent", "received", "invalid", "gaps", "lost", "retries", "dropped"):
        assert key in snap
    assert snap["invalid"] == 3 and snap["invalid_frames"] == 2 and snap["invalid_size"] == 1


def test_rate_limit_logs_first_three_then_powers_of_two():
    limit = RateLimit()
    logged = [n for n in range(1, 5000) if limit("bad") is not None]
    assert logged == [1, 2, 3, 1024, 2048, 4096]
    assert limit("other") == ""  # kinds are counted apart


class _Failing:
    """A listener that raises what it is given, once per call."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def __call__(self, *args: object) -> None:
        self.calls += 1
        raise self.exc


def _dispatcher(bus: Bus, stats: BridgeStats) -> Dispatcher:
    return Dispatcher(bus, "t", frozenset({"order"}), ThreadState(), stats, wake_io=lambda: None)


@pytest.mark.timeout(20)
def test_dispatch_counts_listener_failures_but_not_system_exit():
    bus = Bus()
    logs: list[tuple] = []
    bus.subscribe("log", lambda msg, level=20: logs.append((msg, level)))
    stats = BridgeStats()
    disp = _dispatcher(bus, stats)
    exiting = _Failing(SystemExit(3))
    try:
        bus.subscribe("order", _Failing(ValueError("listener bug")))
        disp.put(("pub", [["order", False, [[1], [2]]]], "w1"))
        assert wait_for(lambda: disp.done == 1)
        assert stats.snapshot()["dispatch_errors"] == 2
        assert stats.snapshot()["dispatched"] == 2

        bus.subscribe("exiting", exiting)
        disp.put(("event", "exiting", ()))
        disp.put(("event", "exiting", ()))
        assert wait_for(lambda: disp.done == 3)
        assert exiting.calls == 2  # the thread went on after the first SystemExit
        snap = stats.snapshot()
        assert snap["dispatch_errors"] == 2 and snap["internal_errors"] == 0
    finally:
        disp.stop()
    assert not disp.thread.is_alive()


@pytest.mark.timeout(20)
def test_dispatch_thread_bug_is_logged_with_traceback_every_time():
    bus = Bus()
    logs: list[str] = []
    bus.subscribe("log", lambda msg, level=20: logs.append(msg))
    stats = BridgeStats()
    disp = _dispatcher(bus, stats)
    try:
        for _ in range(5):
            disp.put(("pub", [["order", False, None]], "w1"))  # not a list of entries: a bug here
        assert wait_for(lambda: disp.done == 5)
    finally:
        disp.stop()
    errors = [m for m in logs if "dispatch thread error" in m]
    assert len(errors) == 5 and all("Traceback" in m for m in errors)
    assert stats.snapshot()["internal_errors"] == 5


@pytest.mark.timeout(20)
def test_io_thread_error_is_logged_with_traceback_every_time():
    bus = Bus()
    logs: list[str] = []
    bus.subscribe("log", lambda msg, level=20: logs.append(msg))
    hub = Bridge(bus, role="hub", name=unique("h"), heartbeat=None).subscribe()
    try:
        def broken() -> None:
            raise RuntimeError("a bug in the I/O thread")

        for _ in range(5):
            hub._io.call(broken)
        assert wait_for(lambda: len([m for m in logs if "a bug in the I/O thread" in m]) == 5)
        errors = [m for m in logs if "a bug in the I/O thread" in m]
        assert all("Traceback" in m for m in errors)
        assert hub.stats()["internal_errors"] == 5
        assert hub._io.thread.is_alive()
    finally:
        bus.exit()
    assert not hub._io.thread.is_alive()
