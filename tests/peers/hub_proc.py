"""Test program: a hub bus + Bridge in its own process (to be SIGKILLed by a test).

Usage: python hub_proc.py NAME [--start]
Prints ``ENDPOINTS <string>`` once bound; with --start it commands every peer to start.
Exits when stdin closes or on SIGTERM.
"""

import sys
import threading

from multibus.bus import Bus
from multibus.plugins import SignalHandler
from multibus.transport.bridge import Bridge


def main() -> int:
    bus = Bus()
    SignalHandler(bus).subscribe()
    bridge = Bridge(bus, role="hub", name=sys.argv[1], channels=["data", "done", "report",
                                                                    "burst"],
                    heartbeat=0.1, peer_timeout=1.0).subscribe()
    if "--start" in sys.argv:
        bridge.command("start")
    bus.start()
    print("ENDPOINTS", bridge.endpoints.to_string(), flush=True)

    def watch_stdin() -> None:
        sys.stdin.read()
        bus.defer(bus.exit)

    threading.Thread(target=watch_stdin, daemon=True).start()
    bus.block()
    return 0


if __name__ == "__main__":
    sys.exit(main())
