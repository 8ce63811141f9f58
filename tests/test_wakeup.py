"""The shared wake-up primitive and call queue (multibus.wakeup)."""

from __future__ import annotations

import select
import signal
import threading

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
