"""Worker target for tests/test_sockets.py: write what this worker inherited to
``$PROBE_DIR/<worker>.json`` (LISTEN_* variables, fds 3 and 4, ``inherited_sockets()``)."""

from __future__ import annotations

import json
import os
import socket


def _fd(fd: int) -> list | None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return [s.family.name, s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
    finally:
        s.close()


def probe(bus) -> None:
    import multibus

    socks = multibus.inherited_sockets()
    out = {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in
                ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "MULTIBUS_SOCKET_FDS")},
        "fds": {str(fd): _fd(fd) for fd in (3, 4)},
        "sockets": {n: [s.family.name, str(s.getsockname())] for n, s in socks.items()},
    }
    for s in socks.values():
        s.close()
    path = os.path.join(os.environ["PROBE_DIR"], os.environ["MULTIBUS_WORKER"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
