"""Test program: our plugins on the real ``cherrypy.engine``.

Usage: python cherrypy_engine.py PIDFILE
Prints "HEARTBEAT" from a Monitor every 0.05 s; SIGTERM/SIGINT exit through our SignalHandler.
"""

import logging
import sys

import cherrypy

from multibus.plugins import LogBridge, Monitor, PIDFile, SignalHandler

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
engine = cherrypy.engine
engine.autoreload.unsubscribe()  # CherryPy's own: would re-exec on file changes
LogBridge(engine, "engine").subscribe()
SignalHandler(engine).subscribe()
PIDFile(engine, sys.argv[1]).subscribe()
Monitor(engine, lambda: print("HEARTBEAT", flush=True), frequency=0.05).subscribe()
engine.start()
engine.block()
print("DONE", flush=True)
