"""Behaviour of multibus.Bus beyond what CherryPy's own test_bus.py covers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from progs import procio

from multibus import Bus, ChannelFailures, states


@pytest.fixture
def logs(bus):
    records: list[tuple[str, int]] = []
    bus.subscribe("log", lambda msg, level: records.append((msg, level)))
    return records


def test_equal_priorities_run_in_subscription_order(bus):
    calls = []
    for i in range(20):
        bus.subscribe("tick", lambda i=i: calls.append(i), priority=50 if i % 2 else 10)
    bus.publish("tick")
    assert calls == [i for i in range(20) if i % 2 == 0] + [i for i in range(20) if i % 2]


def test_priority_attribute_and_resubscribe_changes_priority(bus):
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    b.priority = 10
    bus.subscribe("ch", a)
    bus.subscribe("ch", b)
    bus.publish("ch")
    bus.subscribe("ch", b, priority=90)  # same callback again: only its priority changes
    bus.publish("ch")
    assert calls == ["b", "a", "a", "b"]
    assert bus.listeners["ch"] == {a, b}


def test_decorator_subscribe_returns_the_function(bus):
    @bus.subscribe("custom", priority=5)
    def handler(x, y=0):
        return x + y

    assert callable(handler)
    assert bus.publish("custom", 1, y=2) == [3]


def test_unsubscribe(bus):
    def f():
        return "f"

    bus.subscribe("ch", f)
    assert bus.publish("ch") == ["f"]
    bus.unsubscribe("ch", f)
    bus.unsubscribe("ch", f)  # absent: no error
    bus.unsubscribe("nochannel", f)
    assert bus.publish("ch") == []
    assert bus.listeners["ch"] == set()


def test_unknown_channel_publishes_nothing(bus):
    assert bus.publish("nobody-listens", 1, 2) == []
    assert bus.publish(None) == []


def test_exiting_tells_the_stop_that_opens_an_exit(bus):
    seen = []
    bus.subscribe("stop", lambda: seen.append(bus.exiting))
    assert bus.exiting is False
    bus.start()
    bus.stop()
    bus.start()
    bus.exit()
    assert seen == [False, True]
    assert bus.exiting is True


def test_failures_collected_and_all_listeners_run(bus, logs):
    ran = []

    def bad():
        raise ValueError("boom")

    bus.subscribe("ch", bad, priority=1)
    bus.subscribe("ch", lambda: ran.append(1), priority=2)
    bus.subscribe("ch", bad, priority=3)
    with pytest.raises(ChannelFailures) as info:
        bus.publish("ch")
    assert ran == [1]
    # the same callback twice is one subscription, so one failure
    assert [type(e) for e in info.value.get_instances()] == [ValueError]
    assert any(level == 40 and "Traceback" in msg and "boom" in msg for msg, level in logs)


def test_keyboard_interrupt_propagates_at_once(bus):
    ran = []

    def interrupt():
        raise KeyboardInterrupt

    bus.subscribe("ch", interrupt, priority=1)
    bus.subscribe("ch", lambda: ran.append(1), priority=2)
    with pytest.raises(KeyboardInterrupt):
        bus.publish("ch")
    assert ran == []


def test_system_exit_code_bumped_after_earlier_failure(bus):
    def fail():
        raise RuntimeError

    def leave():
        raise SystemExit(0)

    bus.subscribe("ch", fail, priority=1)
    bus.subscribe("ch", leave, priority=2)
    with pytest.raises(SystemExit) as info:
        bus.publish("ch")
    assert info.value.code == 1

    bus2 = Bus()
    bus2.subscribe("ch", leave)
    with pytest.raises(SystemExit) as info:
        bus2.publish("ch")
    assert info.value.code == 0


def test_start_failure_stops_bus_and_raises_original(bus, logs):
    stopped = []
    bus.subscribe("start", lambda: None, priority=10)
    bus.subscribe("start", lambda: 1 / 0, priority=20)
    bus.subscribe("stop", lambda: stopped.append(True))
    with pytest.raises(ZeroDivisionError):
        bus.start()
    assert bus.state is states.STOPPED
    assert stopped == [True]
    messages = [m for m, _ in logs]
    assert "Bus STOPPED" in messages
    assert any(m.startswith("Shutting down due to error in start listener") for m in messages)


def test_several_start_failures_raise_channel_failures(bus):
    bus.subscribe("start", lambda: 1 / 0)
    bus.subscribe("start", lambda: [][1])
    with pytest.raises(ChannelFailures) as info:
        bus.start()
    assert [type(e) for e in info.value.get_instances()] == [ZeroDivisionError, IndexError]


def test_keyboard_interrupt_during_start_exits_bus(bus):
    def interrupted():
        raise KeyboardInterrupt

    bus.subscribe("start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bus.start()
    assert bus.state is states.EXITING


def test_exit_failure_reaches_exiting_then_raises(bus, logs):
    exited = []
    bus.subscribe("stop", lambda: 1 / 0)
    bus.subscribe("exit", lambda: exited.append(True))
    with pytest.raises(ChannelFailures):
        bus.exit()
    assert bus.state is states.EXITING
    assert exited == [True]
    assert [m for m, _ in logs if m.startswith("Bus ")][-2:] == ["Bus EXITING", "Bus EXITED"]
    bus.exit()  # already EXITING: nothing happens again
    assert exited == [True]


def test_exit_while_starting_wins(bus):
    """A start listener that exits the bus must not be overwritten by STARTED."""
    bus.subscribe("start", bus.exit)
    bus.start()
    assert bus.state is states.EXITING


def test_restart_sets_execv_and_exits(bus):
    bus.restart()
    assert bus.execv is True
    assert bus.state is states.EXITING


def test_restart_reexecutes_process(tmp_path):
    """block() re-executes the process with its original arguments after restart()."""
    marker = tmp_path / "runs"
    script = tmp_path / "restarter.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib
        from multibus import Bus
        marker = pathlib.Path({str(marker)!r})
        runs = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(runs + 1))
        bus = Bus()
        bus.start()
        if runs == 0:
            bus.restart()
        else:
            bus.exit()
        bus.block()
    """))
    proc = subprocess.run([sys.executable, str(script), "arg1"], timeout=30)
    assert proc.returncode == 0
    assert marker.read_text() == "2"


def test_wait_returns_at_once_on_state_change(bus):
    done = threading.Event()
    result = []

    def waiter():
        result.append(bus.wait(states.STARTED))
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    try:
        bus.start()
        assert done.wait(2)
        assert result == [True]
    finally:
        bus.exit()
        t.join(2)


def test_wait_timeout_returns_false(bus):
    t0 = time.monotonic()
    assert bus.wait(states.STARTED, timeout=0.05) is False
    assert time.monotonic() - t0 < 2


def test_wait_accepts_several_states(bus):
    assert bus.wait([states.STARTED, states.STOPPED], timeout=1) is True


def test_defer_runs_in_waiting_thread(bus):
    seen = []

    def record():
        seen.append(threading.current_thread())
        bus.exit()

    t = threading.Thread(target=bus.defer, args=(record,))
    t.start()
    t.join()
    assert bus.wait(states.EXITING, timeout=5)
    assert seen == [threading.current_thread()]


def test_block_timeout_stops_waiting_for_threads(bus, logs):
    release = threading.Event()
    t = threading.Thread(target=release.wait, name="stuck-worker")
    t.start()
    try:
        bus.exit()
        bus.block(timeout=0.05)
        messages = [m for m, _ in logs]
        assert "Waiting for thread stuck-worker." in messages
        assert any("stuck-worker still running" in m for m in messages)
    finally:
        release.set()
        t.join()


def test_concurrent_subscribe_and_publish():
    bus = Bus()
    stop = threading.Event()
    errors = []
    counts = [0]

    def publisher():
        try:
            while not stop.is_set():
                bus.publish("ch")
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    def subscriber(k):
        try:
            for i in range(300):
                def cb(i=i):
                    counts[0] += 1
                bus.subscribe("ch", cb, priority=i % 7)
                bus.unsubscribe("ch", cb)
                bus.subscribe(f"ch{k}", cb)
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    pubs = [threading.Thread(target=publisher) for _ in range(2)]
    subs = [threading.Thread(target=subscriber, args=(k,)) for k in range(3)]
    for t in pubs + subs:
        t.start()
    try:
        for t in subs:
            t.join(30)
    finally:
        stop.set()
        for t in pubs:
            t.join(30)
    assert errors == []
    assert bus.listeners["ch"] == set()
    assert all(len(bus.listeners[f"ch{k}"]) == 300 for k in range(3))
    bus.exit()


@pytest.mark.parametrize("start", [False, True], ids=["stopped", "started"])
def test_idle_blocked_process_does_not_wake(start):
    """A process in block() with no 'main' listener sleeps: < 1 wake-up per second."""
    code = textwrap.dedent(f"""
        from multibus import Bus
        bus = Bus()
        if {start}:
            bus.start()
        print("ready", flush=True)
        bus.block()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        p = psutil.Process(proc.pid)
        # block() sleeps in poll() on its signal-wakeup pipe, in the main thread, no other
        procio.wait_for(lambda: "poll" in Path(f"/proc/{proc.pid}/wchan").read_text(), 5,
                        "the blocked process to sleep in poll()")
        assert p.num_threads() == 1
        window = 2.0
        before = p.num_ctx_switches().voluntary
        time.sleep(window)  # measuring an idle interval, not synchronising
        after = p.num_ctx_switches().voluntary
        assert (after - before) / window < 1.0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_deferred_calls_prefer_the_waiting_main_thread(bus):
    """With the main thread in wait(), another waiting thread leaves deferred calls to it."""
    ran_in = []
    other_waiting = threading.Event()

    def other():
        other_waiting.set()
        bus.wait(states.EXITING, timeout=10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert other_waiting.wait(5)

        def record_and_exit():
            ran_in.append(threading.current_thread())
            bus.exit()

        def defer_once_main_waits():
            deadline = time.monotonic() + 5
            while not bus._main_waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            bus.defer(record_and_exit)

        threading.Thread(target=defer_once_main_waits, daemon=True).start()
        assert bus.wait(states.EXITING, timeout=10)
    finally:
        bus.exit()
        t.join(10)
    assert ran_in == [threading.main_thread()]


def test_ctrl_c_reaches_block_when_another_thread_gets_the_signal():
    """SIGINT delivered to a non-main thread still wakes block() at once (no polling tick)."""
    code = textwrap.dedent("""
        import signal, threading
        from multibus import Bus
        bus = Bus()
        bus.start()
        ready = threading.Event()
        def other():
            # only this thread accepts SIGINT, so the kernel must deliver it here
            ready.set()
            threading.Event().wait()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        t = threading.Thread(target=other, daemon=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        # the thread inherits the mask at creation: create it while unblocked, then block
        # SIGINT in the main thread only
        t.start()
        ready.wait()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        print("ready", flush=True)
        bus.block()
        print("exited", bus.state, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # a SIGINT before block() is a plain KeyboardInterrupt: send it once the main thread
        # sleeps in block()'s poll() on the signal-wakeup pipe
        procio.wait_for(lambda: "poll" in Path(f"/proc/{proc.pid}/task/{proc.pid}/wchan")
                        .read_text(), 5, "the main thread to sleep in block()")
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=10)
        assert "exited states.EXITING" in out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
