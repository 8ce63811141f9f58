"""Test program: a bus holding a PIDFile until SIGTERM/SIGINT.

Usage: python pidfile_bus.py PATH
Prints "STARTED <pid>" once the bus started; on a start failure prints the error to stderr and
exits 3. Logs go to stderr.
"""

import logging
import sys

from multibus.bus import Bus
from multibus.plugins import LogBridge, PIDFile, SignalHandler

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
bus = Bus()
LogBridge(bus).subscribe()
SignalHandler(bus).subscribe()
PIDFile(bus, sys.argv[1]).subscribe()
try:
    bus.start()
except Exception as e:  # noqa: BLE001 - reported to the test
    print(f"START FAILED: {e}", file=sys.stderr, flush=True)
    bus.exit()
    sys.exit(3)
print(f"STARTED {bus.state.name}", flush=True)
bus.block()
