"""Worker targets for the supervisor tests: ``targets.jobs:<name>`` called with the worker's bus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

RAN = os.environ.get("MB_TEST_MARK", "")


def job(bus) -> None:
    """A well-behaved worker: nothing to do but follow its bus."""


def gated(bus) -> None:
    """Once the file $MB_GATE exists, a new worker waits (before it connects, so it stays
    SPAWNING on the supervisor) until $MB_GATE.open exists too."""
    import time

    gate = os.environ["MB_GATE"]
    deadline = time.monotonic() + 30
    while os.path.exists(gate) and not os.path.exists(gate + ".open"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{gate}.open never appeared")
        time.sleep(0.01)


def failing(bus) -> None:
    """Fails while the worker sets up, before it can report STARTED."""
    raise RuntimeError("database unreachable at db.invalid:5432")


def failing_start(bus) -> None:
    """A plugin whose 'start' listener fails."""

    def start() -> None:
        raise RuntimeError("cannot open port 99999")

    bus.subscribe("start", start)


def slow_start(bus) -> None:
    """A 'start' listener that takes $MB_START_SECONDS (default 60): the worker stays STARTING."""
    gate = threading.Event()
    seconds = float(os.environ.get("MB_START_SECONDS", "60"))
    bus.subscribe("start", lambda: gate.wait(seconds))


def stubborn(bus) -> None:
    """Ignores SIGTERM and never finishes stopping."""
    forever = threading.Event()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    bus.subscribe("stop", lambda: forever.wait())


def grandchild(bus) -> None:
    """Spawns a long-lived grandchild (pid written to $MB_PIDFILE) when started."""

    def start() -> None:
        p = subprocess.Popen(["sleep", "60"])
        path = os.environ["MB_PIDFILE"]
        with open(path + ".tmp", "w") as f:
            f.write(str(p.pid))
        os.rename(path + ".tmp", path)

    bus.subscribe("start", start)


def _print_when_started(bus, count: int, then_exit: bool) -> None:
    """Once started, print 'line 0' .. 'line <count-1>' from a thread; then die at once (no
    flush beyond the writes themselves) if ``then_exit``."""

    def start() -> None:
        def go() -> None:
            w = sys.stdout.write
            for i in range(count):
                w(f"line {i}\n")
            sys.stdout.flush()
            if then_exit:
                os._exit(0)

        threading.Thread(target=go, daemon=True).start()

    bus.subscribe("start", start)


def chatty_exit(bus) -> None:
    """Prints 10,000 lines, then dies at once (no flush beyond the writes themselves)."""
    _print_when_started(bus, 10000, then_exit=True)


def numbered_lines(bus) -> None:
    """Prints 'line 0' .. 'line 1999' on stdout once started, then keeps running."""
    _print_when_started(bus, 2000, then_exit=False)


def chatty_on_exit(bus) -> None:
    """Prints 10,000 lines in its 'exit' listener, just before the process exits."""

    def exit_() -> None:
        w = sys.stdout.write
        for i in range(10000):
            w(f"line {i}\n")
        sys.stdout.flush()

    bus.subscribe("exit", exit_)


def dies_soon(bus) -> None:
    """Reports STARTED, then dies (exit 1) $MB_DIE_AFTER s later (default 0.3): restarted
    again and again, it reaches the restart limit of a running fleet."""

    def start() -> None:
        delay = float(os.environ.get("MB_DIE_AFTER", "0.3"))
        threading.Timer(delay, lambda: os._exit(1)).start()

    bus.subscribe("start", start)


def logs_in_body(bus) -> None:
    """Logs on its bus in its own body (before the worker connects) and when started."""
    bus.log("body record 1")
    bus.log("body record 2", 30)
    bus.subscribe("start", lambda: bus.log("start record"))


def never_returns(bus) -> None:
    """A target that does its work itself instead of returning (the mistake)."""
    threading.Event().wait()


def order_bank(bus) -> None:
    """Publishes $MB_ORDERS orders (1 KiB each) every 5 ms on the mirrored 'order' channel."""
    from multibus.plugins import Monitor

    n = int(os.environ.get("MB_ORDERS", "20"))
    count = iter(range(1 << 62))
    pad = "x" * 1024

    def place() -> None:
        for _ in range(n):
            bus.publish("order", next(count), pad)

    Monitor(bus, place, frequency=0.005, name="orders").subscribe()


def order_broker(bus) -> None:
    """Counts the orders it receives; logs 'orders N' every 1000."""
    got = [0]

    def on_order(i, pad) -> None:
        got[0] += 1
        if got[0] % 1000 == 0:
            bus.log(f"orders {got[0]}")

    bus.subscribe("order", on_order)


def order_stuck(bus) -> None:
    """Its 'order' listener blocks forever: its bridge's dispatch thread never returns."""
    bus.subscribe("order", lambda *a: threading.Event().wait())


def secret_probe(bus) -> None:
    """Logs whether its supervisor's secret is still in its environment (it must not be)."""
    bus.log(f"secret in env: {'MULTIBUS_SECRET' in os.environ}")
