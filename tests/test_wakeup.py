"""The shared wake-up primitive and call queue (multibus.wakeup)."""

from __future__ import annotations

import contextlib
import select
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from multibus.wakeup import CallQueue, Wakeup


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_wake_ends_a_poll_from_another_thread_and_drain_empties_it():
    w = Wakeup()
    try:
        poller = select.poll()
        poller.register(w.fileno(), select.POLLIN)
        assert poller.poll(0) == []
        t = threading.Thread(target=w.wake)
        t.start()
        assert poller.poll(5000)
        t.join()
        w.drain()
        assert poller.poll(0) == []
    finally:
        w.close()


def test_wake_never_blocks_on_a_full_pipe():
    w = Wakeup()
    try:
        for _ in range(100_000):
            w.wake()
        assert w.drain()
    finally:
        w.close()


def test_wakeup_fd_receives_signal_numbers():
    w = Wakeup()
    old_fd = signal.set_wakeup_fd(w.write_fd, warn_on_full_buffer=False)
    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert bytes([signal.SIGUSR1]) in w.drain()
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.set_wakeup_fd(old_fd)
        w.close()


def test_calls_run_in_due_order_then_arrival_order_and_cancel_holds():
    clock = FakeClock()
    woken = []
    q = CallQueue(wake=lambda: woken.append(1), clock=clock)
    ran: list[str] = []
    q.call_later(2.0, lambda: ran.append("late"))
    q.call_soon(lambda: ran.append("a"))
    q.call_soon(lambda: ran.append("b"))
    cancelled = q.call_later(1.0, lambda: ran.append("cancelled"))
    cancelled.cancel()
    assert len(woken) == 4
    assert q.timeout() == 0.0
    assert q.run_due() == 2
    assert ran == ["a", "b"]
    assert q.timeout() == pytest.approx(1.0)
    clock.now += 2.0
    assert q.run_due() == 1
    assert ran == ["a", "b", "late"]
    assert q.timeout() is None and not q


def test_a_failing_call_goes_to_on_error_and_the_rest_still_run():
    errors = []
    q = CallQueue(on_error=lambda func, exc: errors.append(exc))
    ran = []
    q.call_soon(lambda: 1 / 0)
    q.call_soon(lambda: ran.append(1))
    q.run_due()
    assert ran == [1]
    assert isinstance(errors[0], ZeroDivisionError)


def test_system_exit_propagates_from_run_due():
    q = CallQueue(on_error=lambda func, exc: None)

    def leave() -> None:
        raise SystemExit(3)

    q.call_soon(leave)
    with pytest.raises(SystemExit):
        q.run_due()


def test_a_call_queued_for_now_by_a_running_call_runs_in_the_same_pass():
    q = CallQueue()
    ran = []
    q.call_soon(lambda: q.call_soon(lambda: ran.append("second")))
    q.run_due()
    assert ran == ["second"]


@contextlib.contextmanager
def _owner_loop() -> Iterator[CallQueue]:
    """A thread that owns a CallQueue as every multibus loop does: poll, drain, run."""
    w = Wakeup()
    q = CallQueue(wake=w.wake)
    stop = threading.Event()

    def owner() -> None:
        poller = select.poll()
        poller.register(w.fileno(), select.POLLIN)
        while not stop.is_set():
            timeout = q.timeout()
            poller.poll(None if timeout is None else timeout * 1000)
            w.drain()
            q.run_due()

    loop = threading.Thread(target=owner)
    loop.start()
    try:
        yield q
    finally:
        stop.set()
        q.call_soon(lambda: None)
        loop.join(10)
        w.close()


def test_no_wake_up_is_lost_under_concurrent_producers():
    """Producers on several threads, switching as often as possible: every call runs."""
    per_thread, threads = 50_000, 2
    ran = [0]
    all_ran = threading.Event()

    def count() -> None:
        ran[0] += 1
        if ran[0] == per_thread * threads:
            all_ran.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with _owner_loop() as q:
            producers = [
                threading.Thread(target=lambda: [q.call_soon(count) for _ in range(per_thread)])
                for _ in range(threads)
            ]
            for t in producers:
                t.start()
            for t in producers:
                t.join(30)
            assert all_ran.wait(30), f"{ran[0]} of {per_thread * threads} calls ran"
    finally:
        sys.setswitchinterval(switch)


def test_ping_pong_never_loses_the_wake_up_that_ends_a_sleep():
    """One call at a time, each waited for: the owner sleeps between them, so a wake-up
    lost to a race between wake() and drain() would leave a call unrun."""
    with _owner_loop() as q:
        for i in range(3000):
            done = threading.Event()
            q.call_soon(done.set)
            assert done.wait(10), f"call {i} never ran"
