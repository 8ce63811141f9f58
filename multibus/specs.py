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

__all__ = ["RESTART_MODES", "SLOW_PEER_POLICIES", "SpecError", "WorkerSpec", "Intensity",
           "parse_size"]

RESTART_MODES = ("permanent", "transient", "temporary")
SLOW_PEER_POLICIES = ("drop", "restart")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_RESERVED_CHANNELS = {"main", "start", "stop", "graceful", "exit", "log"}


class SpecError(ValueError):
    """A worker spec is invalid; the message names the field and the fix."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(value: int | str) -> int:
    """A size in bytes: an integer, or a string like ``"512MB"`` (KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB of 1024; ``"100"`` and ``"100B"`` are bytes). ValueError otherwise
    (or when it is not > 0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower().removesuffix("b")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"{value!r} is not a size: use bytes or a string like '512MB', "
                         "'1.5GiB' (KB, MB, GB, KiB, MiB, GiB)")
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be > 0")
    return n


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
    max_memory: bytes of RSS (or a size string, see :func:`parse_size`) past which a
        worker is gracefully replaced (:mod:`multibus.recycle`); None: no limit.
    max_age: seconds after which a worker is gracefully replaced, plus a random
        ``uniform(0, max_age_jitter)`` of its own (so a group is not replaced all at once).
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
    max_memory: int | None = None
    max_age: float | None = None
    max_age_jitter: float = 0.0

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
        self._check_recycling(where)
        channels = (self.channels,) if isinstance(self.channels, str) else self.channels
        channels = tuple(channels)
        for ch in channels:
            if not isinstance(ch, str) or not ch or ch in _RESERVED_CHANNELS:
                raise SpecError(
                    f"{where}: channel {ch!r} cannot be mirrored (lifecycle channels travel as "
                    "commands, 'main' and 'log' are never mirrored)"
                )
        object.__setattr__(self, "channels", channels)
        if not isinstance(self.env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise SpecError(f"{where}: env must map str to str")
        object.__setattr__(self, "env", dict(self.env))
        if self.cwd is not None and not isinstance(self.cwd, str):
            raise SpecError(f"{where}: cwd must be a path string or None")

    def _check_recycling(self, where: str) -> None:
        """max_memory (bytes, or a size string), max_age and max_age_jitter."""
        if self.max_memory is not None:
            try:
                object.__setattr__(self, "max_memory", parse_size(self.max_memory))
            except ValueError as e:
                raise SpecError(f"{where}: max_memory {e}") from None
        if self.max_age is not None and (not isinstance(self.max_age, int | float) or isinstance(
                self.max_age, bool) or self.max_age <= 0):
            raise SpecError(f"{where}: max_age {self.max_age!r} must be a number of seconds > 0")
        jitter = self.max_age_jitter
        if not isinstance(jitter, int | float) or isinstance(jitter, bool) or jitter < 0:
            raise SpecError(f"{where}: max_age_jitter {jitter!r} must be a number of seconds "
                            ">= 0")
        if jitter and self.max_age is None:
            raise SpecError(f"{where}: max_age_jitter needs max_age; set max_age too")

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
