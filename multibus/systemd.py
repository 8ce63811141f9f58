"""sd_notify: tell systemd how a ``Type=notify`` service is doing (READY=1, STOPPING=1...)."""

from __future__ import annotations

import os
import socket

__all__ = ["sd_notify"]


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's $NOTIFY_SOCKET; False if unset/failed.

    Stdlib only: one AF_UNIX datagram, abstract namespace when the address starts with '@'.
    """
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
