"""Where a bridge's sockets are: the three addresses of one hub, as one value and one string.

:class:`Endpoints` is the address value (parse, print, ipc paths, network or not). For the
default ipc endpoints, :func:`private_ipc` gives a hub its sockets in the private runtime dir
and claims the name for this process (:mod:`multibus.rundir` keeps the dir and the name
locks; this module maps endpoints onto them). tcp endpoints need CURVE keys and an allow-list:
see :mod:`multibus.transport.keys`. This module knows nothing of buses, spawning or zmq.

``python -m multibus.transport.endpoints keygen DIR`` makes a keypair (``keys.main``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from multibus import names, rundir
from multibus.rundir import (
    HUB_SOCKETS,
    HubNameInUse,
    UnsafeRuntimeDir,
    runtime_dir,
    sweep_stale,
)

__all__ = [
    "EndpointError",
    "Endpoints",
    "HubNameInUse",
    "InvalidEndpoint",
    "UnsafeRuntimeDir",
    "check_name",
    "claim_ipc",
    "ipc_owner",
    "private_ipc",
    "remove_ipc",
    "shared_ipc",
]

IPC_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, including the NUL
_SCHEMES = ("ipc", "tcp", "inproc")
_LOCAL_SCHEMES = ("ipc", "inproc")

class _Value:
    """An immutable value: its fields are its ``__slots__``; equal and hashed by them."""

    __slots__: tuple[str, ...] = ()

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name!r})")

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({args})"


class EndpointError(Exception):
    """Base class for the errors of this module and of :mod:`multibus.transport.keys`."""


class InvalidEndpoint(EndpointError, ValueError):
    """A malformed endpoint string, hub name or ipc path."""


# --------------------------------------------------------------------------- endpoints


def _scheme(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not rest or scheme not in _SCHEMES:
        raise InvalidEndpoint(
            f"invalid endpoint {url!r}: expected ipc://PATH, tcp://HOST:PORT or inproc://NAME"
        )
    return scheme


def _split_tcp(url: str) -> tuple[str, str]:
    host, sep, port = url[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise InvalidEndpoint(f"invalid tcp endpoint {url!r}: expected tcp://HOST:PORT")
    return host, port


class Endpoints(_Value):
    """The three sockets of one hub: ``control`` (ROUTER/DEALER: commands, acks, state,
    heartbeats), ``down`` (ROUTER -> DEALER: mirrored channels, per peer) and ``up`` (peers
    -> hub: mirrored publishes and logs, on their own socket so a log flood never delays a command).

    ``to_string()`` gives one string for argv/env; ``Endpoints.parse`` reads it back:
    ``ipc:///dir/NAME`` means ``NAME.control``/``NAME.down``/``NAME.up``; ``tcp://HOST:P`` means
    ports P, P+1, P+2 (``tcp://HOST:*`` = three ephemeral ports, for binding); anything else is
    the three URLs joined by commas.
    """

    __slots__ = ("control", "down", "up")
    control: str
    down: str
    up: str

    def __init__(self, control: str, down: str, up: str) -> None:
        for url in (control, down, up):
            _scheme(url)
            if "," in url:
                raise InvalidEndpoint(f"invalid endpoint {url!r}: commas are not allowed")
        self._init(control=control, down=down, up=up)

    def urls(self) -> tuple[str, str, str]:
        return (self.control, self.down, self.up)

    @property
    def is_network(self) -> bool:
        """True when any socket is reachable from the network (needs CURVE)."""
        return any(_scheme(u) not in _LOCAL_SCHEMES for u in self.urls())

    def ipc_paths(self) -> list[Path]:
        """Filesystem paths of the ipc sockets (empty for tcp/inproc)."""
        return [Path(u[len("ipc://"):]) for u in self.urls() if u.startswith("ipc://")]

    @classmethod
    def ipc(cls, base: str | os.PathLike[str]) -> Endpoints:
        return cls.parse(f"ipc://{os.fspath(base)}")

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", port: int | str = "*") -> Endpoints:
        return cls.parse(f"tcp://{host}:{port}")

    def to_string(self) -> str:
        schemes = {_scheme(u) for u in self.urls()}
        if len(schemes) == 1 and schemes <= set(_LOCAL_SCHEMES):
            base = self.control.removesuffix(".control")
            if self.urls() == tuple(f"{base}.{s}" for s in HUB_SOCKETS):
                return base
        if schemes == {"tcp"}:
            parts = [_split_tcp(u) for u in self.urls()]
            hosts = {h for h, _ in parts}
            ports = [p for _, p in parts]
            if len(hosts) == 1 and ports == ["*"] * 3:
                return self.control
            if len(hosts) == 1 and all(p.isdigit() for p in ports):
                first = int(ports[0])
                if [int(p) for p in ports] == [first, first + 1, first + 2]:
                    return self.control
        return ",".join(self.urls())

    @classmethod
    def parse(cls, text: str | Endpoints) -> Endpoints:
        if isinstance(text, Endpoints):
            return text
        text = text.strip()
        if "," in text:
            parts = [p.strip() for p in text.split(",")]
            if len(parts) != 3:
                raise InvalidEndpoint(
                    f"invalid endpoints {text!r}: expected 3 comma-separated URLs "
                    "(control,down,up)"
                )
            return cls(*parts)
        scheme = _scheme(text)
        if scheme in _LOCAL_SCHEMES:
            return cls(*(f"{text}.{s}" for s in HUB_SOCKETS))
        host, port = _split_tcp(text)
        if port == "*":
            return cls(text, text, text)
        if not port.isdigit() or not 1 <= int(port) <= 65533:
            raise InvalidEndpoint(
                f"invalid tcp endpoint {text!r}: port must be 1..65533 (it uses PORT..PORT+2) "
                "or * for ephemeral ports"
            )
        first = int(port)
        return cls(*(f"tcp://{host}:{first + i}" for i in range(3)))

    def __str__(self) -> str:
        return self.to_string()


# --------------------------------------------------------------------------- ipc names


def check_name(name: str) -> str:
    """Validate a hub name: 1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'."""
    try:
        return names.check_name(name, "hub name")
    except ValueError as exc:
        raise InvalidEndpoint(str(exc)) from None


def _base(endpoints: Endpoints) -> Path:
    """The base path of ipc ``endpoints`` (``DIR/NAME``), whose ``.lock`` is the hub lock."""
    paths = endpoints.ipc_paths()
    if not paths:
        raise InvalidEndpoint(f"no ipc endpoint in {endpoints}: only ipc hubs take a lock")
    return Path(str(paths[0]).removesuffix(".control"))


def claim_ipc(endpoints: Endpoints) -> None:
    """Take the hub lock for ipc ``endpoints`` (a ``.lock`` file next to the sockets, flock'd
    for as long as this process holds it, with our pid in it). Raises ``HubNameInUse`` when a
    live hub holds it, this process included. Stale socket files of a dead hub are removed
    once the lock is ours."""
    rundir.claim(_base(endpoints), endpoints.ipc_paths(), f"hub endpoint {endpoints}")


def ipc_owner(endpoints_or_name: Endpoints | str) -> int | None:
    """Pid of the live hub holding these ipc endpoints (or hub name), else None."""
    if isinstance(endpoints_or_name, str) and "://" not in endpoints_or_name:
        try:
            base = rundir.name_path(check_name(endpoints_or_name), create=False)
        except FileNotFoundError:  # no runtime dir yet: no hub either
            return None
    else:
        base = _base(Endpoints.parse(endpoints_or_name))
    return rundir.owner(base)


def _ipc_for(name: str, directory: Path) -> Endpoints:
    base = directory / name
    longest = f"{base}.control"
    if len(os.fsencode(longest)) > IPC_PATH_MAX:
        raise InvalidEndpoint(
            f"ipc path {longest} is {len(os.fsencode(longest))} bytes, over the "
            f"{IPC_PATH_MAX}-byte limit of unix sockets; use a shorter hub name or point "
            "XDG_RUNTIME_DIR at a shorter directory"
        )
    return Endpoints.ipc(base)


def private_ipc(name: str) -> Endpoints:
    """Default endpoints of the hub called ``name``: ipc sockets in ``runtime_dir()``, claimed
    for this process (``HubNameInUse`` names the live owner's pid otherwise). Give them back
    with ``remove_ipc``."""
    directory = runtime_dir()
    endpoints = _ipc_for(check_name(name), directory)
    claim_ipc(endpoints)
    sweep_stale(directory)
    return endpoints


def shared_ipc(name: str, uid: int) -> Endpoints:
    """Endpoints in :func:`multibus.rundir.shared_dir` where the hub ``name`` (whose private
    endpoints this process has claimed) also listens for peers running as user ``uid``:
    ``NAME.u<UID>.control``/``.down``/``.up``. Stale sockets there are removed (the name's
    lock is ours, so they are a dead hub's)."""
    endpoints = _ipc_for(f"{check_name(name)}.u{int(uid)}", rundir.shared_dir())
    rundir.remove_sockets(endpoints.ipc_paths())
    return endpoints


def remove_ipc(endpoints: Endpoints | str) -> bool:
    """Remove the ipc socket files of ``endpoints`` and release its hub lock. Only when this
    process holds the lock or nobody does: a live hub's sockets are never pulled from under
    it. Returns True when the files were removed."""
    endpoints = Endpoints.parse(endpoints)
    if not endpoints.ipc_paths():
        return False
    return rundir.release(_base(endpoints), endpoints.ipc_paths())


if __name__ == "__main__":
    from multibus.transport.keys import main

    sys.exit(main())
