"""Worker targets for the group tests: each appends what happens to it to $MB_STAMPS."""

from __future__ import annotations

import os


def _stamp(what: str) -> None:
    line = f"{os.environ.get('MULTIBUS_WORKER', '?')} {what}\n"
    fd = os.open(os.environ["MB_STAMPS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def stamped(bus) -> None:
    """Writes 'spawn' now, then 'start' and 'stop' as its bus starts and stops."""
    _stamp("spawn")
    bus.subscribe("start", lambda: _stamp("start"))
    bus.subscribe("stop", lambda: _stamp("stop"))
