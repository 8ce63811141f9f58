"""SignalHandler: signals become bus transitions run by the main loop, never inside the handler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from progs.procio import Child, prog

from multibus.bus import states
from multibus.plugins import SignalHandler

pytestmark = pytest.mark.timeout(30)


def events(child: Child, *names: str) -> list[dict]:
    """Read the JSON event lines for ``names`` in order."""
    out = []
    for name in names:
        line = child.expect(lambda ln, n=name: ln.startswith("{") and json.loads(ln)["event"] == n)
        out.append(json.loads(line))
    return out


def assert_main_loop(evs: list[dict]) -> None:
    for ev in evs:
        assert ev["in_handler"] is False, ev
        assert ev["thread"] == "MainThread", ev


@pytest.mark.parametrize("kind", ["multibus", "cherrypy"])
def test_sigusr1_graceful_then_sigterm_exits(kind):
    with Child(prog("signal_bus.py"), kind) as child:
        child.expect("READY")
        child.signal(signal.SIGUSR1)
        (graceful,) = events(child, "graceful")
        assert graceful["state"] == "STARTED"
        child.signal(signal.SIGTERM)
        stop, exit_ = events(child, "stop", "exit")
        assert stop["state"] == "STOPPING" and exit_["state"] == "EXITING"
        assert_main_loop([graceful, stop, exit_])
        child.expect("DONE")
        assert child.wait() == 0
        assert "LOG Caught signal SIGUSR1." in child.stdout
        assert "LOG Caught signal SIGTERM." in child.stdout


@pytest.mark.parametrize("kind", ["multibus", "cherrypy"])
def test_sigint_exits_cleanly(kind):
    with Child(prog("signal_bus.py"), kind) as child:
        child.expect("READY")
        child.signal(signal.SIGINT)
        assert_main_loop(events(child, "stop", "exit"))
        child.expect("DONE")
        assert child.wait() == 0
        assert not any("KeyboardInterrupt" in line for line in child.stderr)


def test_sighup_without_tty_is_graceful():
    with Child(prog("signal_bus.py"), stdin=subprocess.DEVNULL) as child:
        child.expect("READY")
        child.signal(signal.SIGHUP)
        (graceful,) = events(child, "graceful")
        assert_main_loop([graceful])
        assert graceful["state"] == "STARTED"
        child.signal(signal.SIGTERM)
        events(child, "exit")
        assert child.wait() == 0


def test_sighup_with_tty_exits():
    master, slave = os.openpty()
    try:
        with Child(prog("signal_bus.py"), stdin=slave) as child:
            child.expect("READY")
            child.signal(signal.SIGHUP)
            assert_main_loop(events(child, "stop", "exit"))
            child.expect("DONE")
            assert child.wait() == 0
            assert not any(ln.startswith('{"event": "graceful"') for ln in child.stdout)
    finally:
        os.close(master)
        os.close(slave)


# -- in-process (pytest runs tests in the main thread) ----------------------------------------


def test_handler_only_records_and_main_loop_transitions(bus):
    handler = SignalHandler(bus).subscribe()
    try:
        bus.start()
        handler._handle_signal(signal.SIGTERM, None)
        assert bus.state is states.STARTED  # nothing happened inside the handler
        assert bus.wait(states.EXITING, timeout=5)  # the waiting thread ran the transition
    finally:
        handler.unsubscribe()


def test_real_signal_in_process(bus):
    handler = SignalHandler(bus).subscribe()
    try:
        bus.start()
        os.kill(os.getpid(), signal.SIGTERM)
        assert bus.wait(states.EXITING, timeout=5)
    finally:
        handler.unsubscribe()


def test_a_signal_is_handled_before_the_work_already_waiting(bus):
    """300 queued operations must not make SIGTERM wait (issue: 150 s)."""
    order: list[object] = []
    handler = SignalHandler(bus)
    handler.handlers = {"SIGUSR2": lambda: order.append("signal")}
    handler.subscribe()
    try:
        for i in range(300):
            bus.defer(lambda i=i: order.append(i))
        bus.defer(bus.exit)
        handler._handle_signal(signal.SIGUSR2, None)
        assert bus.wait(states.EXITING, timeout=5)
        assert order[0] == "signal" and order[1:] == list(range(300))
    finally:
        handler.unsubscribe()


def test_second_sigint_before_dispatch_interrupts(bus):
    handler = SignalHandler(bus).subscribe()
    try:
        handler._handle_signal(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            handler._handle_signal(signal.SIGINT, None)
    finally:
        handler.unsubscribe()


def test_subscribe_outside_main_thread_refuses(bus):
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def run():
        try:
            SignalHandler(bus).subscribe()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, name="not-main")
    t.start()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0]) and "not-main" in str(errors[0])
    assert signal.getsignal(signal.SIGTERM) is before


def test_unsubscribe_restores_previous_handlers_and_wakeup_fd(bus):
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGUSR1, mine)
    try:
        handler = SignalHandler(bus).subscribe()
        assert signal.getsignal(signal.SIGUSR1) == handler._handle_signal
        assert "SIGUSR1" in bus.listeners and bus.listeners["SIGUSR1"]
        handler.unsubscribe()
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert not bus.listeners["SIGUSR1"]
        assert signal.set_wakeup_fd(-1) == -1  # ours was removed
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_custom_handler_and_unknown_signal(bus):
    handler = SignalHandler(bus)
    with pytest.raises(ValueError, match="No such signal"):
        handler.set_handler("SIGNOPE")
    calls = []

    def on_usr2():
        calls.append(threading.current_thread().name)
        bus.exit()

    handler.handlers = {"SIGUSR2": on_usr2}
    handler.subscribe()
    try:
        bus.start()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert bus.wait(states.EXITING, timeout=5)
        assert calls == ["MainThread"]
    finally:
        handler.unsubscribe()


def test_inherited_ignored_sigint_and_sighup_stay_ignored(bus):
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        handler = SignalHandler(bus).subscribe()
        try:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == handler._handle_signal
        finally:
            handler.unsubscribe()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGHUP, old_hup)


def test_wakeup_watcher_wakes_a_blocked_wait(bus):
    """If the Python-level handler is late (signal landed just before the main thread blocked),
    the C-level wake-up byte still makes the watcher thread wake the bus."""
    handler = SignalHandler(bus).subscribe()
    try:
        assert handler._watcher is not None and handler._watcher.is_alive()
        bus.start()
        handler._pending.append(signal.SIGTERM)  # recorded, but no defer() from the handler
        os.write(handler._wakeup.write_fd, bytes([signal.SIGTERM]))
        assert bus.wait(states.EXITING, timeout=5)
    finally:
        handler.unsubscribe()
    assert handler._watcher is None


FORK_CHILD = """
import os, signal, sys
from multibus.bus import Bus
from multibus.plugins import SignalHandler
h = SignalHandler(Bus()).subscribe()
parent_fds = (h._wakeup.fileno(), h._wakeup.write_fd)
pid = os.fork()
if pid == 0:
    ok = (h._watcher is not None and h._watcher.is_alive()
          and (h._wakeup.fileno(), h._wakeup.write_fd) != parent_fds
          and signal.set_wakeup_fd(h._wakeup.write_fd) == h._wakeup.write_fd)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_forked_child_gets_its_own_wakeup_pipe_and_watcher():
    out = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr


# -- the run loop's options: abort_start, interrupt_again ---------------------------------------


def test_abort_start_signal_while_starting_exits_the_bus(bus):
    handler = SignalHandler(bus, abort_start=("SIGTERM",)).subscribe()
    try:
        bus.subscribe("start", lambda: handler._handle_signal(signal.SIGTERM, None))
        with pytest.raises(KeyboardInterrupt, match="SIGTERM while starting"):
            bus.start()
        assert bus.state is states.EXITING  # Bus.start exited it
    finally:
        handler.unsubscribe()


def test_signal_not_in_abort_start_waits_for_the_main_loop(bus):
    handler = SignalHandler(bus, abort_start=("SIGTERM",)).subscribe()
    try:
        bus.subscribe("start", lambda: handler._handle_signal(signal.SIGINT, None))
        bus.start()  # not aborted: SIGINT is only recorded
        assert bus.state is states.STARTED
        assert bus.wait(states.EXITING, timeout=5)  # then the waiting thread exits the bus
    finally:
        handler.unsubscribe()


def test_interrupt_again_runs_in_the_handler_while_exiting_and_is_said_once_outside(bus):
    calls: list[str] = []
    said: list[tuple[str, bool]] = []
    in_handler = threading.Event()

    def on_log(msg, level=20, *a):
        if msg.startswith("interrupted again"):
            said.append((msg, in_handler.is_set()
                         and threading.current_thread() is threading.main_thread()))

    bus.subscribe("log", on_log)
    handler = SignalHandler(bus, interrupt_again=lambda: calls.append("kill")).subscribe()

    def second_sigint():
        in_handler.set()
        handler._handle_signal(signal.SIGINT, None)  # no KeyboardInterrupt: kill instead
        handler._handle_signal(signal.SIGINT, None)  # and again
        in_handler.clear()

    try:
        bus.start()
        handler._handle_signal(signal.SIGINT, None)  # not exiting yet: recorded only
        assert calls == []
        bus.subscribe("stop", second_sigint)
        assert bus.wait(states.EXITING, timeout=5)
        assert calls == ["kill", "kill"]
    finally:
        handler.unsubscribe()
    assert said == [(SignalHandler.interrupt_again_message, False)]
