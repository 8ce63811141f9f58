"""Test program: daemonize a bus (PIDFile + SignalHandler); optionally fail a start listener.

Usage: python daemon_bus.py PIDFILE LOGFILE [--fail]
The daemon logs to LOGFILE and runs until SIGTERM. With --fail a start listener (priority 80,
after the fork) raises ValueError("deliberate start failure").
"""

import logging
import sys

from multibus.bus import Bus
from multibus.plugins import Daemonizer, LogBridge, PIDFile, SignalHandler

pidfile, logfile = sys.argv[1], sys.argv[2]
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
bus = Bus()
LogBridge(bus).subscribe()
SignalHandler(bus).subscribe()
Daemonizer(bus, stdout=logfile, stderr=logfile, startup_timeout=20).subscribe()
PIDFile(bus, pidfile).subscribe()
if "--fail" in sys.argv:
    def fail():
        raise ValueError("deliberate start failure")
    bus.subscribe("start", fail, priority=80)
try:
    bus.start()
except Exception:  # noqa: BLE001 - any start failure exits 2
    bus.exit()
    sys.exit(2)
bus.block()
