"""A real CherryPy site run by multibus workers (``examples/cherrypy_site.toml``).

Decision: the worker's bus (a ``multibus.Bus``, owned by ``python -m multibus.worker``)
*drives* ``cherrypy.engine``; it does not replace it. The target :func:`serve` mounts the app,
points ``cherrypy.server`` at ``HTTP_HOST`` : ``HTTP_PORT_BASE + index`` (index = the ``N`` in
the worker name ``web.N``) and subscribes to the worker bus:

=============  =====================================================================
worker bus     cherrypy
=============  =====================================================================
start          ``cherrypy.engine.start()``  (binds the port, serves)
stop           ``cherrypy.engine.stop()``   (closes the port; the process stays)
graceful       ``cherrypy.engine.graceful()``: CherryPy's own reload (its 'graceful'
               listeners, e.g. log file reopening, plus this app's config reload).
               The listening socket is never closed, so no request fails.
exit           ``cherrypy.engine.exit()``
=============  =====================================================================

CherryPy's engine log is forwarded to the worker bus (so it reaches ``multibus logs``), its
screen logging, autoreloader and signal handling are off: the supervisor owns signals and
processes. New code needs new processes: ``multibus exit``, then run the fleet again
(``multibus restart`` is a bus transition of the same processes, which keep the code they
imported). Needs CherryPy: ``python -m pip install -e '.[cherrypy]'``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import cherrypy


def worker_name(default: str = "web.0") -> str:
    """This worker's name (``group.index``), from ``MULTIBUS_WORKER`` or the worker's argv."""
    name = os.environ.get("MULTIBUS_WORKER")
    if name:
        return name
    argv = sys.argv
    if "--name" in argv[:-1]:
        return argv[argv.index("--name") + 1]
    return default


class Site:
    """The app: says who answered and how many times it was reloaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0
        self.greeting = os.environ.get("GREETING", "hello")
        self._lock = threading.Lock()

    def reload(self) -> None:
        with self._lock:
            self.generation += 1
            self.greeting = os.environ.get("GREETING", "hello")

    @cherrypy.expose
    def index(self) -> str:
        return (f"{self.greeting} from {self.name} (pid {os.getpid()}), "
                f"generation {self.generation}\n")


def serve(bus: Any) -> None:
    """Worker target: ``cherrypy_app:serve``."""
    name = worker_name()
    index = int(name.rpartition(".")[2] or 0)
    host = os.environ.get("HTTP_HOST", "127.0.0.1")
    port = int(os.environ.get("HTTP_PORT_BASE", "8080")) + index
    site = Site(name)
    cherrypy.config.update({
        "environment": "production",  # no autoreload, no checker, no screen log
        "server.socket_host": host,
        "server.socket_port": port,
        "server.thread_pool": int(os.environ.get("HTTP_THREADS", "8")),
        "log.screen": False,
    })
    cherrypy.tree.mount(site, "/")
    engine = cherrypy.engine
    engine.subscribe("graceful", site.reload)
    engine.subscribe("log", lambda msg, level=20: _forward(bus, msg, level))

    def stop() -> None:
        if engine.state == engine.states.STARTED:  # exit() stops a stopped bus again
            engine.stop()

    bus.subscribe("start", engine.start)
    bus.subscribe("stop", stop)
    bus.subscribe("graceful", engine.graceful)
    bus.subscribe("exit", engine.exit)


def _forward(bus: Any, msg: str, level: int = 20) -> None:
    """CherryPy's engine log to the worker bus, minus its 'Bus ...' lines (ours say it)."""
    if not msg.startswith("Bus "):
        bus.log(f"cherrypy: {msg}", level)
