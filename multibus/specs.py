"""Worker specs: what a supervisor runs, as plain data (OTP-style child specs).

A spec names a group of identical workers; each instance is called ``"<name>.<i>"``
(:class:`~multibus.names.WorkerName`). Specs
are validated up front so a typo fails with one line naming the field and the fix, before
anything is spawned. ``WorkerSpec.from_dict`` accepts the same keys as the constructor, so
specs can come from JSON/TOML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from multibus.names import WorkerName, valid_group
from multibus.sockets import parse_address

__all__ = ["RESTART_MODES", "SLOW_PEER_POLICIES", "SocketSpec", "SpecError", "WorkerSpec",
           "Intensity"]

RESTART_MODES = ("permanent", "transient", "temporary")
SLOW_PEER_POLICIES = ("drop", "restart")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_RESERVED_CHANNELS = {"main", "start", "stop", "graceful", "exit", "log"}


class SpecError(ValueError):
    """A worker spec is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class WorkerSpec:
    """A group of identical workers.

    name: group name ([A-Za-z0-9_-], unique per supervisor); instances are ``name.0``...
    target: ``package.module:callable``, called in the child as ``callable(bus)`` to
        subscribe its plugins.
    count: number of instances. channels: bus channels mirrored between parent and worker.
    restart: 'permanent' (always restarted), 'transient' (restarted unless it exits 0),
        'temporary' (never restarted).
    stop_timeout: seconds a worker gets to stop/exit on request before SIGTERM, then SIGKILL.
    start_timeout: seconds a worker gets to report STARTED.
    env: extra environment variables; cwd: working directory (None: the supervisor's).
    slow_peer: what happens to a worker that looks stuck: it stops reading its mirrored
        channels (its queue in the hub makes no progress for 5 s, or holds 32 MiB; see
        ``transport/fanout.py``), or its main thread does not take up a lifecycle command
        within 5 s of receiving it. 'drop' (the default: mirrored messages for it are
        dropped, counted and logged once per episode, until it reads again; nobody else
        waits) or 'restart' (it is terminated, and restarted as its ``restart`` mode says).
        Either way its status row says ``stuck`` (why) while it lasts.
    sockets: names of the supervisor's listening sockets (``[sockets.NAME]``) its workers
        inherit at fd 3... (LISTEN_FDS, see :mod:`multibus.sockets`).
    max_surge: replacements a rolling reload runs ahead of the old workers (default 1).
    """

    name: str
    target: str
    count: int = 1
    channels: tuple[str, ...] = ()
    restart: str = "permanent"
    stop_timeout: float = 5.0
    start_timeout: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    slow_peer: str = "drop"
    sockets: tuple[str, ...] = ()
    max_surge: int = 1

    def __post_init__(self) -> None:
        if not valid_group(self.name):
            raise SpecError(
                f"worker spec name {self.name!r} is invalid: use 1-64 letters, digits, '_' or '-'"
            )
        where = f"worker spec {self.name!r}"
        if not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise SpecError(
                f"{where}: target {self.target!r} must look like 'package.module:callable'"
            )
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0:
            raise SpecError(f"{where}: count {self.count!r} must be an integer >= 0")
        if self.restart not in RESTART_MODES:
            raise SpecError(
                f"{where}: restart {self.restart!r} must be one of {', '.join(RESTART_MODES)}"
            )
        if self.slow_peer not in SLOW_PEER_POLICIES:
            raise SpecError(f"{where}: slow_peer {self.slow_peer!r} must be one of "
                            f"{', '.join(SLOW_PEER_POLICIES)}")
        for key in ("stop_timeout", "start_timeout"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"{where}: {key} {value!r} must be a number of seconds > 0")
        channels = (self.channels,) if isinstance(self.channels, str) else self.channels
        channels = tuple(channels)
        for ch in channels:
            if not isinstance(ch, str) or not ch or ch in _RESERVED_CHANNELS:
                raise SpecError(
                    f"{where}: channel {ch!r} cannot be mirrored (lifecycle channels travel as "
                    "commands, 'main' and 'log' are never mirrored)"
                )
        object.__setattr__(self, "channels", channels)
        self._check_reload_keys(where)
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise SpecError(f"{where}: env must map str to str")
        object.__setattr__(self, "env", dict(self.env))
        if self.cwd is not None and not isinstance(self.cwd, str):
            raise SpecError(f"{where}: cwd must be a path string or None")

    def _check_reload_keys(self, where: str) -> None:
        """``sockets`` and ``max_surge`` (issue 17)."""
        socks = (self.sockets,) if isinstance(self.sockets, str) else tuple(self.sockets)
        if not all(isinstance(s, str) and s for s in socks) or len(set(socks)) != len(socks):
            raise SpecError(f"{where}: sockets {socks!r} must be distinct socket names")
        object.__setattr__(self, "sockets", socks)
        surge = self.max_surge
        if not isinstance(surge, int) or isinstance(surge, bool) or surge < 1:
            raise SpecError(f"{where}: max_surge {surge!r} must be an integer >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerSpec:
        """Build a spec from plain data; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"worker spec {data.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        missing = [k for k in ("name", "target") if k not in data]
        if missing:
            raise SpecError(f"worker spec is missing {', '.join(missing)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def instance_names(self, count: int | None = None) -> list[str]:
        n = self.count if count is None else count
        return [str(WorkerName(self.name, i)) for i in range(n)]


@dataclass(frozen=True)
class SocketSpec:
    """A listening socket the supervisor owns (``[sockets.NAME]``, :mod:`multibus.sockets`):
    ``address`` ('host:port', '[v6]:port' or 'unix:/path'), the listen ``backlog``, and
    ``mode`` (unix sockets: the file's permissions, e.g. 0o660)."""

    name: str
    address: str
    backlog: int = 1024
    mode: int | None = None

    def __post_init__(self) -> None:
        parse_address(self.address)  # ValueError says what is wrong


@dataclass(frozen=True)
class Intensity:
    """Restart intensity: more than ``max_restarts`` restarts within ``period`` seconds
    (across the fleet) stops the fleet with an error instead of crash-looping."""

    max_restarts: int = 5
    period: float = 10.0


def coerce_specs(specs: Iterable[WorkerSpec | Mapping[str, Any]]) -> list[WorkerSpec]:
    """Specs from objects or dicts; duplicate names are an error."""
    out: list[WorkerSpec] = []
    seen: set[str] = set()
    for s in specs:
        spec = s if isinstance(s, WorkerSpec) else WorkerSpec.from_dict(s)
        if spec.name in seen:
            raise SpecError(f"two worker specs are named {spec.name!r}: names must be unique")
        seen.add(spec.name)
        out.append(spec)
    return out
