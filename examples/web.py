"""A CherryPy site served by a fleet of workers on one shared socket (``examples/web.toml``).

The supervisor binds ``[sockets.http]`` and every worker inherits it at fd 3 with
``LISTEN_PID`` set to its own pid (the systemd convention), so CherryPy's server, cheroot,
serves on it without binding anything: no code for it here. Each page says which code
``VERSION`` and which pid answered, so a rolling reload (``multibus reload``) can be watched::

    python -m multibus run examples/web.toml
    curl http://127.0.0.1:8080/          # version 1 from site.0 (pid 4242)
    # edit VERSION below, then:
    python -m multibus reload            # new processes on the new code; no request fails

Decisions: the worker's bus drives ``cherrypy.engine`` (as ``examples/cherrypy_app.py``
does). One thing differs for a shared socket: CherryPy's ``server.stop()`` waits until the
port is free, which it never is while the supervisor holds it, so :func:`serve` stops the
HTTP server itself (cheroot stops accepting, finishes the requests it has, and leaves the
socket to the other workers). Needs CherryPy: ``python -m pip install -e '.[cherrypy]'``.
"""

from __future__ import annotations

import os
from typing import Any

import cherrypy

import multibus

VERSION = "1"  # what the page says; change it and `multibus reload` to deploy


class Site:
    """The app: says who answered."""

    def __init__(self, name: str) -> None:
        self.name = name

    @cherrypy.expose
    def index(self) -> str:
        return f"version {VERSION} from {self.name} (pid {os.getpid()})\n"


_WSGI: list[Any] = []


def app(environ: dict[str, Any], start_response: Any) -> Any:
    """The same CherryPy site as a plain WSGI callable, ``web:app``, for other servers
    (gunicorn in ``benchmarks/bench_reload.py``); mounted on first use."""
    if not _WSGI:
        cherrypy.config.update({"environment": "production", "log.screen": False})
        _WSGI.append(cherrypy.tree.mount(Site("gunicorn"), "/"))
    return _WSGI[0](environ, start_response)


def serve(bus: Any) -> None:
    """Worker target: ``web:serve``."""
    name = os.environ.get("MULTIBUS_WORKER", "web.0")
    socks = multibus.inherited_sockets()  # {'http': socket}: only to say where it listens
    host, port = "127.0.0.1", 8080
    for sock in socks.values():
        host, port = sock.getsockname()[:2]
        sock.close()  # a duplicate: fd 3 stays open for cheroot
        break
    cherrypy.config.update({
        "environment": "production",  # no autoreload, no checker, no screen log
        "server.socket_host": host,  # only for its log lines: LISTEN_PID makes it use fd 3
        "server.socket_port": port,
        "server.thread_pool": int(os.environ.get("HTTP_THREADS", "8")),
        "log.screen": False,
    })
    cherrypy.tree.mount(Site(name), "/")
    engine = cherrypy.engine
    engine.subscribe("log", lambda msg, level=20: _forward(bus, msg, level))

    def stop() -> None:
        server = cherrypy.server
        if server.running:  # not server.stop(): it waits for the shared port to be free
            server.httpserver.stop()  # stop accepting, finish in-flight requests
            server.running = False
        if engine.state == engine.states.STARTED:
            engine.stop()

    bus.subscribe("start", engine.start)
    bus.subscribe("stop", stop)
    bus.subscribe("graceful", engine.graceful)
    bus.subscribe("exit", engine.exit)


def _forward(bus: Any, msg: str, level: int = 20) -> None:
    """CherryPy's engine log to the worker bus, minus its 'Bus ...' lines (ours say it)."""
    if not msg.startswith("Bus "):
        bus.log(f"cherrypy: {msg}", level)
