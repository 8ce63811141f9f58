"""Listening sockets the supervisor owns and its workers inherit (the systemd convention).

Supervisor side: :func:`bind` opens one ``[sockets.NAME]`` of a fleet file (a
:class:`~multibus.specs.SocketSpec`: ``127.0.0.1:8080``, ``[::1]:8080`` or ``unix:/path``)
and listens, before
any worker starts; it stays open while workers come and go, so a connection waits in the
backlog instead of being refused. :class:`BindError` is a one-line message naming the socket.

Worker side: the spawner passes the sockets' descriptors (``pass_fds`` for an exec'd worker,
SCM_RIGHTS for a forked one) and names them in :data:`FDS_ENV`; the worker's bootstrap calls
:func:`adopt` before any user code: the descriptors are moved to 3, 4, ... and ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the worker's own pid) are set, as systemd does, so
cheroot, gunicorn, waitress or uvicorn ``--fd`` take them without code, and
:func:`inherited_sockets` returns them by name. Layer 0: plain sockets and descriptors only.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # socket is imported where it is used: a worker that only adopt()s
    import socket  # starts without it

__all__ = ["BindError", "FDS_ENV", "LISTEN_VARS", "adopt", "bind", "bind_all",
           "bound_address", "clear_listen_env", "close_all", "inherited_sockets", "listen_env",
           "parse_address", "place_fds"]

SD_LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: where a worker finds its sockets' descriptors before :func:`adopt` moves them to 3...
FDS_ENV = "MULTIBUS_SOCKET_FDS"
MAX_SOCKETS = 64  # per worker


class BindError(ValueError):
    """A socket cannot be bound; the message names it and the fix (one line)."""


def parse_address(address: str) -> tuple[int, str | tuple[str, int]]:
    """('127.0.0.1:8080' | '[::1]:8080' | 'unix:/path') -> (family, sockaddr)."""
    import socket

    if not isinstance(address, str) or not address:
        raise ValueError("expected 'host:port', '[::1]:port' or 'unix:/path'")
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path {path!r} must be absolute (unix:/run/app.sock)")
        return socket.AF_UNIX, path
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r}: expected 'host:port' (port 0-65535), '[::1]:port' or "
                         "'unix:/path'")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    if ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. '[::1]:8080'")
    return socket.AF_INET, (host, int(port))


def _unix_in_use(path: str) -> bool:
    """A live server answers on ``path``; a stale file (its server died) does not."""
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind(spec: Any) -> socket.socket:
    """Bind and listen on ``spec`` (a :class:`~multibus.specs.SocketSpec`: name, address,
    backlog, mode), close-on-exec as every descriptor of ours (the spawner hands it to each
    worker). BindError: one line naming the socket and the fix."""
    import socket

    family, addr = parse_address(spec.address)
    where = f"sockets.{spec.name}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            assert isinstance(addr, str)
            try:
                if stat.S_ISSOCK(os.lstat(addr).st_mode):
                    if _unix_in_use(addr):
                        raise BindError(f"{where}: {addr} is in use by a running server; stop "
                                        f"it or change {where}.address")
                    os.unlink(addr)  # stale: its server is gone
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            why = "address already in use" if e.errno == 98 else (e.strerror or str(e))
            raise BindError(f"{where}: cannot bind {spec.address}: {why}; stop what uses it or "
                            f"change {where}.address") from None
        if family == socket.AF_UNIX and spec.mode is not None:
            os.chmod(addr, spec.mode)  # type: ignore[arg-type]
        sock.listen(spec.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_all(specs: Iterable[Any]) -> dict[str, socket.socket]:
    """:func:`bind` each of ``specs``, by name; on a failure the ones bound are closed."""
    out: dict[str, socket.socket] = {}
    try:
        for spec in specs:
            out[spec.name] = bind(spec)
    except BaseException:
        close_all(out.values())
        raise
    return out


def bound_address(sock: socket.socket) -> str:
    """What ``sock`` listens on, as a fleet file writes it (the real port for port 0)."""
    import socket

    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def listen_env(names: Sequence[str], fds: Sequence[int]) -> dict[str, str]:
    """The environment a worker gets for sockets ``names`` passed as ``fds`` (in its own
    numbering, before :func:`adopt`); LISTEN_PID is set by the worker itself."""
    return {"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names),
            FDS_ENV: ",".join(str(fd) for fd in fds)}


def clear_listen_env(env: dict[str, str]) -> None:
    """Drop what a worker must not inherit from us (we may be socket-activated ourselves)."""
    for key in (*LISTEN_VARS, FDS_ENV):
        env.pop(key, None)


def place_fds(fds: Sequence[int], start: int = SD_LISTEN_FDS_START) -> list[int]:
    """Move descriptors ``fds`` to ``start``, ``start + 1``, ... (inheritable, as systemd
    passes them); whatever was open there is replaced. Any order works, cycles included: each
    is first duplicated above the targets, then put in place. Returns the new numbers."""
    top = start + len(fds)
    temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    for fd in fds:
        if fd >= top:
            os.close(fd)
    for i, tmp in enumerate(temps):
        os.dup2(tmp, start + i)  # dup2's copy is inheritable
        os.close(tmp)
    return list(range(start, top))


def adopt(environ: Mapping[str, str] | None = None) -> int:
    """Worker bootstrap, before any user code: move the sockets named in :data:`FDS_ENV` to
    3... and set ``LISTEN_PID`` to our pid (``LISTEN_FDS``/``LISTEN_FDNAMES`` came with the
    environment). Returns how many; 0 (and no LISTEN_* at all) without sockets."""
    env = os.environ if environ is None else environ
    raw = env.get(FDS_ENV)
    if environ is None:
        os.environ.pop(FDS_ENV, None)
    if not raw:
        return 0
    fds = [int(x) for x in raw.split(",") if x]
    if fds != list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds))):
        place_fds(fds)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    return len(fds)


def inherited_sockets() -> dict[str, socket.socket]:
    """The listening sockets this process inherited by the systemd convention, by name
    (``LISTEN_FDNAMES``; unnamed ones are ``fd3``, ``fd4``...): in a multibus worker those of
    its group's ``sockets``. Each call returns new socket objects on duplicated descriptors:
    closing them leaves fd 3... open for other servers. Empty when LISTEN_PID is not ours."""
    import socket

    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, socket.socket] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out[name] = socket.socket(fileno=os.dup(fd))
    return out


def close_all(socks: Iterable[socket.socket]) -> None:
    """Close the supervisor's sockets and remove the files of unix ones it created."""
    import socket

    for sock in list(socks):
        if sock.fileno() < 0:
            continue  # closed already
        path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        sock.close()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
