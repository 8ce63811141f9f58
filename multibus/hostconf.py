"""The fleet file's ``[upstream]`` and ``[downstream]`` tables: one fleet across hosts.

A child supervisor joins a parent (``[upstream]``, or ``multibus run --join ADDRESS``); a
parent takes children whose CURVE public keys it lists (``[downstream]``). Both need tcp with
CURVE keys, loaded here, when the file is read, so a missing, malformed or world-readable
key refuses the run with one line (exit 2) before anything starts.

A host's name is bound to its key: each ``allow`` entry names the one host its key may join
as, a key file by its stem (``"keys/host-b.key"``: host ``host-b``) or a table ``{ host-b =
"keys/b.key" }``. The child's host name (``upstream.host``, else its supervisor's name) must
be that name: the parent's hub refuses every frame a host sends under another name, so one
host cannot pass itself off as another (claim its name, get its commands, report its status).
:mod:`multibus.upstream` and :mod:`multibus.downstream` use these values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multibus.names import valid_host
from multibus.transport.endpoints import EndpointError, Endpoints
from multibus.transport.keys import CurveConfig, load_keys

__all__ = ["DOWNSTREAM_KEYS", "LOST_POLICIES", "UPSTREAM_KEYS", "DownstreamConfig",
           "UpstreamConfig", "parse_downstream", "parse_upstream"]

UPSTREAM_KEYS = ("address", "host", "key", "server_key", "timeout", "on_upstream_lost")
DOWNSTREAM_KEYS = ("listen", "key", "allow", "timeout")
LOST_POLICIES = ("stop", "keep")
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class UpstreamConfig:
    """How this supervisor joins its parent: ``address`` (tcp://HOST:PORT, None until
    ``--join`` gives it), the ``host`` name it is known by there (None: the supervisor's
    name), its CURVE keys, ``timeout`` (seconds of silence after which the parent is lost)
    and ``on_lost`` ('stop': stop the workers; 'keep': run on)."""

    address: str | None
    host: str | None
    curve: CurveConfig
    timeout: float = DEFAULT_TIMEOUT
    on_lost: str = "stop"

    def endpoints(self) -> Endpoints:
        if self.address is None:
            raise ValueError("no upstream address")
        return Endpoints.parse(self.address)


@dataclass(frozen=True)
class DownstreamConfig:
    """Where this supervisor takes child supervisors: ``listen`` (tcp://ADDR:PORT, ports
    PORT..PORT+2), its CURVE keys with the allow-list of child public keys, each bound to
    the host name it may join as, and ``timeout`` (seconds of silence after which a host is
    LOST)."""

    listen: str
    curve: CurveConfig
    timeout: float = DEFAULT_TIMEOUT


def _tcp(c: Any, key: str, value: Any) -> str:
    text = c.string(key, value)
    try:
        ep = Endpoints.parse(text)
    except EndpointError as e:
        raise c.fail(key, f"tcp://HOST:PORT ({e})", value, got=False) from None
    if not ep.is_network or "*" in text:
        raise c.fail(key, "tcp://HOST:PORT with a port number (it uses PORT..PORT+2)", value)
    return text


def _keys(c: Any, key: str, path: Path, public_only: bool = False) -> Any:
    try:
        keys = load_keys(path)
    except EndpointError as e:
        raise c.fail(key, f"a CURVE key file ({e}; make one with `multibus keygen NAME`)",
                     got=False) from None
    if not public_only and keys.secret is None:
        raise c.fail(key, f"a secret key file (NAME.key_secret), not the public key {path}",
                     got=False)
    return keys


def _timeout(c: Any, key: str, table: Mapping[str, Any]) -> float:
    timeout = c.seconds(key, table.get("timeout", DEFAULT_TIMEOUT))
    if timeout < 0.5:
        raise c.fail(key, "at least 0.5 seconds", timeout)
    return timeout


def _host_name(c: Any, key: str, host: Any) -> str:
    if not valid_host(host):
        raise c.fail(key, "a host name of [A-Za-z0-9_.-], not shaped like a worker name "
                     "(group.N)", host)
    return host


ALLOW_HINT = 'allow = ["keys/host-b.key"] (host-b: the file\'s stem) or [{ host-b = "b.key" }]'


def _allow(c: Any, entries: Any, base: Path) -> dict[bytes, str]:
    """``downstream.allow``: each host's public key -> that host's name. An entry is a key
    file, allowed for the host named by its stem (``keys/host-b.key``: ``host-b``), or a
    table ``{ HOST = "FILE" }``."""
    key = "downstream.allow"
    if not isinstance(entries, list) or not entries:
        raise c.fail(key, f"the public key files of the hosts allowed to join: {ALLOW_HINT}",
                     entries, got=not isinstance(entries, list))
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, str) and entry:
            pairs.append((_host_name(c, key, Path(entry).stem), entry))
        elif isinstance(entry, dict) and entry:
            pairs += [(_host_name(c, key, h), c.string(key, f)) for h, f in entry.items()]
        else:
            raise c.fail(key, f"key files or {{ HOST = FILE }} tables: {ALLOW_HINT}", entry)
    allowed: dict[bytes, str] = {}
    files: dict[str, str] = {}
    for host, path in pairs:
        public = _keys(c, key, base / path, True).public
        if host in files:
            raise c.fail(key, f"one key per host, but host {host!r} is given {files[host]} "
                         f"and {path}", got=False)
        if public in allowed:
            raise c.fail(key, f"one host per key, but {path} is the key of host "
                         f"{allowed[public]!r} too; make each host its own key", got=False)
        files[host] = path
        allowed[public] = host
    return allowed


def parse_upstream(c: Any, table: Mapping[str, Any], base: Path) -> UpstreamConfig:
    """``[upstream]`` (``c``: the config's checker, whose ``fail`` makes a ConfigError)."""
    c.keys("upstream", table, UPSTREAM_KEYS)
    address = _tcp(c, "upstream.address", table["address"]) if "address" in table else None
    host = None
    if "host" in table:
        host = _host_name(c, "upstream.host", c.string("upstream.host", table["host"]))
    for k in ("key", "server_key"):
        if k not in table:
            raise c.fail(f"upstream.{k}", "a key file: key = this host's NAME.key_secret, "
                         "server_key = the parent's NAME.key", got=False)
    keys = _keys(c, "upstream.key", base / c.string("upstream.key", table["key"]))
    server = _keys(c, "upstream.server_key",
                   base / c.string("upstream.server_key", table["server_key"]), True)
    on_lost = c.choice("upstream.on_upstream_lost", table.get("on_upstream_lost", "stop"),
                       LOST_POLICIES)
    return UpstreamConfig(address, host, CurveConfig.peer(keys, server.public),
                          _timeout(c, "upstream.timeout", table), on_lost)


def parse_downstream(c: Any, table: Mapping[str, Any], base: Path) -> DownstreamConfig:
    """``[downstream]``: ``listen``, ``key`` and ``allow`` are required."""
    c.keys("downstream", table, DOWNSTREAM_KEYS)
    if "listen" not in table:
        raise c.fail("downstream.listen", 'an address like "tcp://0.0.0.0:7000"', got=False)
    listen = _tcp(c, "downstream.listen", table["listen"])
    if "key" not in table:
        raise c.fail("downstream.key", "this supervisor's NAME.key_secret", got=False)
    keys = _keys(c, "downstream.key", base / c.string("downstream.key", table["key"]))
    allowed = _allow(c, table.get("allow", []), base)
    return DownstreamConfig(listen, CurveConfig.hub(keys, allowed),
                            _timeout(c, "downstream.timeout", table))
