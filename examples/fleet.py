"""A fleet of N job workers under a Supervisor, for a terminal.

    python examples/fleet.py [-n N] [--name NAME]

Logs ``Fleet STARTED: N workers`` once every worker bus is STARTED, and ``Fleet STOPPED`` /
``Fleet EXITED`` on the way out. Press Ctrl-C (at any time, even while it starts) to stop
everything; a second Ctrl-C kills the workers at once. SIGTERM acts like a first Ctrl-C.
Exit status: 0 after a clean stop, 1 if a worker had to be killed or the fleet failed, 2 if
another fleet of that name runs.

Each worker runs ``fleet:job`` (below) in its own process: a bus with one plugin that does a
small job every few seconds and logs it (the log reaches this terminal through the bridge).
``multibus status --name fleet`` (and the other control commands) work on it too.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def job(bus) -> None:
    """Worker target: subscribe a plugin that does a job every 5 s while the bus is STARTED."""
    from multibus.plugins.tasks import Monitor

    count = [0]

    def work() -> None:
        count[0] += 1
        bus.log(f"job {count[0]} done (pid {os.getpid()})")

    Monitor(bus, work, frequency=5, name="job").subscribe()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4, help="number of workers (default 4)")
    ap.add_argument("--name", default="fleet", help="fleet name (ipc endpoints, PID file)")
    ap.add_argument("--stop-timeout", type=float, default=5.0)
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
    from multibus.bus import Bus
    from multibus.runner import FleetRefused, run_fleet
    from multibus.supervisor import WorkerSpec

    bus = Bus()
    bus.subscribe("stop", lambda: bus.log("Fleet STOPPED"), 95)
    bus.subscribe("exit", lambda: bus.log("Fleet EXITED"), 95)
    spec = WorkerSpec(
        name="job",
        target="fleet:job",
        count=args.n,
        stop_timeout=args.stop_timeout,
        env={"PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])},
    )
    try:
        # the same run loop as `multibus run`: signals, log lines on stderr, exit status
        return run_fleet([spec], name=args.name, bus=bus, on_started=lambda sup: bus.log(
            f"Fleet STARTED: {len(sup.table())} workers"))
    except FleetRefused as e:  # e.g. another fleet of that name (names its pid)
        print(f"fleet: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    from multibus.fastexit import exit_now

    exit_now(main())  # the fleet is reaped: skip the interpreter's teardown
