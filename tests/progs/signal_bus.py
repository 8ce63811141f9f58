"""Test program: a bus with a SignalHandler that reports each transition as a JSON line.

Usage: python signal_bus.py [multibus|cherrypy]
Prints READY once started; for every 'graceful'/'stop'/'exit' listener call prints
{"event", "state", "thread", "in_handler"} where in_handler says whether the call happened
inside the Python signal handler's frame (it must not). Prints DONE after block() returns.
"""

import json
import sys

from multibus.plugins import SignalHandler

kind = sys.argv[1] if len(sys.argv) > 1 else "multibus"
if kind == "cherrypy":
    from cherrypy.process.wspbus import Bus
else:
    from multibus.bus import Bus


def in_signal_handler() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is SignalHandler._handle_signal.__code__:
            return True
        frame = frame.f_back
    return False


def reporter(event):
    def listener():
        import threading
        print(json.dumps({"event": event, "state": bus.state.name if hasattr(bus.state, "name")
                          else str(bus.state), "thread": threading.current_thread().name,
                          "in_handler": in_signal_handler()}), flush=True)
    return listener


bus = Bus()
bus.subscribe("log", lambda msg, level=20: print("LOG", msg.splitlines()[0], flush=True))
for event in ("graceful", "stop", "exit"):
    bus.subscribe(event, reporter(event))
SignalHandler(bus).subscribe()
bus.start()
print("READY", flush=True)
bus.block()
print("DONE", flush=True)
