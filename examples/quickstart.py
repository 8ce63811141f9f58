"""Quickstart: a bus with a PID file, signal handling, logging and a heartbeat.

    python examples/quickstart.py [--pidfile PATH]

Prints the PID file's path, logs "heartbeat" every second on stderr, and stops cleanly on
Ctrl-C (SIGINT) or SIGTERM: the bus exits, the PID file is removed, the exit status is 0.
Run it twice to see the second copy refused with the first one's pid.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from multibus import Bus
from multibus.plugins import LogBridge, Monitor, PIDFile, PIDFileError, SignalHandler


def default_pidfile() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(runtime, f"multibus-quickstart-{os.getuid()}.pid")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pidfile", default=default_pidfile(), help="PID file path")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat seconds")
    args = parser.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("quickstart")

    bus = Bus()
    LogBridge(bus).subscribe()            # bus 'log' channel -> logging, levels kept
    print(f"PID file: {args.pidfile}", flush=True)
    pidfile = PIDFile(bus, args.pidfile)
    try:
        pidfile.start()  # take it before anything else: a second copy is refused in one line
    except PIDFileError as e:
        print(f"quickstart: {e}", file=sys.stderr)
        return 1
    pidfile.subscribe()                   # ... and removed when the bus exits
    SignalHandler(bus).subscribe()        # SIGTERM/SIGINT -> exit, SIGUSR1 -> graceful
    Monitor(bus, lambda: log.info("heartbeat"), frequency=args.interval,
            name="heartbeat").subscribe()

    bus.start()
    bus.block()  # returns once the bus has exited (Ctrl-C, SIGTERM, bus.exit())
    return 0


if __name__ == "__main__":
    sys.exit(main())
